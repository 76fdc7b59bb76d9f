from pdrun.launch.cli import main

main()
