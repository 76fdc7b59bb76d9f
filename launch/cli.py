"""The `pdrun` command line."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated, Any

import typer

from pdrun.launch import tiny_model
from pdrun.launch.config import KV_PORTS_PER_INSTANCE, ConfigError, LaunchConfig

app = typer.Typer(
    name="pdrun",
    help="Prefill/decode disaggregation for vLLM: prefillers hand chunked KV to decoders, one OpenAI endpoint "
    "in front.\n\nStart here: pdrun launch --prefill 1 --decode 2",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",
)
model_app = typer.Typer(help="Models pdrun can build locally, with no download.", no_args_is_help=True)
app.add_typer(model_app, name="model")
profile_app = typer.Typer(
    help="Where the time goes: the KV transfer per chunk size, and requests through a deployment.",
    no_args_is_help=True,
)
app.add_typer(profile_app, name="profile")


@model_app.command("tiny")
def model_tiny(
    directory: Annotated[
        Path | None, typer.Argument(help=f"Where to build it (default: {tiny_model.DEFAULT_DIR}).", file_okay=False)
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Rebuild even if a build of this recipe is already there.")
    ] = False,
) -> None:
    """Build the embedded tiny Llama model: random weights from a fixed seed, a BPE tokenizer
    trained locally, a chat template. A few MB, a few seconds; serve it with vLLM like any model.

    Example: pdrun model tiny /tmp/tiny && python -m vllm.entrypoints.openai.api_server --model /tmp/tiny
    """
    try:
        path = tiny_model.build(directory, force=force)
    except FileExistsError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(str(path))


def _default(field: str) -> Any:
    """`pdrun launch`'s default for a setting, as its help states it."""
    return LaunchConfig.model_fields[field].default


def _split_urls(values: list[str] | None) -> list[str]:
    """Repeated options and comma-separated lists alike."""
    return [u.strip() for v in values or [] for u in v.split(",") if u.strip()]


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def launch(
    ctx: typer.Context,
    model: Annotated[
        str | None, typer.Option(help="Model path or name; default: the embedded tiny model (built if absent).")
    ] = None,
    prefill: Annotated[int | None, typer.Option(help=f"Prefill instances (default {_default('prefill')}).")] = None,
    decode: Annotated[int | None, typer.Option(help=f"Decode instances (default {_default('decode')}).")] = None,
    host: Annotated[str | None, typer.Option(help=f"Where the proxy listens (default {_default('host')}).")] = None,
    port: Annotated[
        int | None, typer.Option(help=f"The proxy's port: the one OpenAI endpoint (default {_default('port')}).")
    ] = None,
    policy: Annotated[
        str | None, typer.Option(help="Routing: prefix_aware (default), least_outstanding, round_robin.")
    ] = None,
    transport: Annotated[
        str | None, typer.Option(help="KV hand-off transport: tcp (default) or ucx (ucxx; UCX_TLS picks its paths).")
    ] = None,
    chunk_size: Annotated[int | None, typer.Option(help="Tokens per KV chunk (default 256).")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda or auto (default: cuda if a GPU is seen).")] = None,
    gpus: Annotated[
        str | None,
        typer.Option(
            help="GPU ids, one per instance, e.g. 0,1,2 (default: all); 0,0 shares GPU 0 between two instances, "
            "each given its share by -- --gpu-memory-utilization 0.45."
        ),
    ] = None,
    served_model_name: Annotated[str | None, typer.Option(help="Name clients ask for.")] = None,
    max_model_len: Annotated[int | None, typer.Option(help="vLLM --max-model-len for every instance.")] = None,
    instance_port: Annotated[
        int | None, typer.Option(help=f"First vLLM port, +1 per instance (default {_default('instance_port')}).")
    ] = None,
    kv_port: Annotated[
        int | None,
        typer.Option(
            help=f"First KV transfer port, +{KV_PORTS_PER_INSTANCE} per instance (default {_default('kv_port')})."
        ),
    ] = None,
    cache_cpu_gb: Annotated[
        float | None,
        typer.Option(
            help=f"Memory of the shared KV cache tier, GiB (default {_default('cache_cpu_gb'):g}; 0: no cache tier)."
        ),
    ] = None,
    cache_dir: Annotated[
        Path | None,
        typer.Option(help="Disk tier of the cache; chunks survive restarts (default: memory only).", file_okay=False),
    ] = None,
    cache_disk_gb: Annotated[
        float | None, typer.Option(help=f"Disk tier budget, GiB (default {_default('cache_disk_gb'):g}).")
    ] = None,
    cache_port: Annotated[
        int | None,
        typer.Option(help=f"The cache server's port, its /metrics on the next (default {_default('cache_port')})."),
    ] = None,
    run_dir: Annotated[
        Path | None, typer.Option(help="Logs and state.json (default ~/.cache/pdrun/runs/<time>).")
    ] = None,
    auth_token: Annotated[
        str | None,
        typer.Option(
            envvar="PDRUN_AUTH_TOKEN",
            show_envvar=True,
            help="The secret every KV transfer and cache port asks for; better in the environment than on a "
            "command line (default: a new one per launch, kept in RUN_DIR/auth-token).",
        ),
    ] = None,
    prefill_args: Annotated[
        str | None,
        typer.Option(
            help="Extra vLLM arguments for the prefillers only, one quoted string, after those given after `--` "
            '(e.g. "--max-num-batched-tokens 16384").',
        ),
    ] = None,
    decode_args: Annotated[
        str | None,
        typer.Option(help='Extra vLLM arguments for the decoders only (e.g. "--max-num-seqs 512").'),
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="YAML file with any of these settings (the options win).")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Do not echo the children's logs.")] = False,
    no_restart: Annotated[bool, typer.Option("--no-restart", help="Leave a crashed instance down.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the commands it would run, and exit.")] = False,
) -> None:
    """Start N prefillers, M decoders, the shared KV cache and the proxy in front; keep them up until Ctrl-C.

    Every instance looks up each prompt's leading chunks in the cache tier and loads them instead of
    recomputing them, and writes the chunks it computes behind to it; with `--cache-dir` they
    survive restarts. Arguments after `--` go to every vLLM instance; `--prefill-args` and `--decode-args`
    to one role (vLLM sizes its batch limits from the GPU; a role's own, e.g. a larger prefill token
    budget, go there). Each child's log is kept in the run directory
    and echoed with its name; a crashed instance is restarted with backoff (and is out of rotation
    meanwhile); Ctrl-C or SIGTERM stops the proxy, then the instances, and leaves no process behind.

    Examples:

    * `pdrun launch --prefill 1 --decode 2` (the tiny model; CPU when no GPU is seen)

    * `pdrun launch --prefill 2 --decode 2 --cache-cpu-gb 32 --cache-dir /var/cache/pdrun --cache-disk-gb 500`

    * `pdrun launch --model meta-llama/Llama-3.1-8B --gpus 0,1,2 -- --gpu-memory-utilization 0.85`

    * `pdrun launch -c deploy.yaml --dry-run`
    """
    from pdrun.launch import config as launch_config
    from pdrun.launch import deploy
    from pdrun.launch.supervisor import Supervisor

    overrides: dict[str, Any] = dict(
        model=model,
        prefill=prefill,
        decode=decode,
        host=host,
        port=port,
        policy=policy,
        transport=transport,
        chunk_size=chunk_size,
        device=device,
        served_model_name=served_model_name,
        max_model_len=max_model_len,
        instance_port=instance_port,
        kv_port=kv_port,
        cache_cpu_gb=cache_cpu_gb,
        cache_dir=cache_dir,
        cache_disk_gb=cache_disk_gb,
        cache_port=cache_port,
        run_dir=run_dir,
        auth_token=auth_token,
    )
    if gpus is not None:
        try:
            overrides["gpus"] = [int(g) for g in gpus.split(",") if g.strip()]
        except ValueError:
            _fail(f"--gpus takes comma-separated GPU ids like 0,1,2, not {gpus!r}")
    if ctx.args:
        overrides["vllm_args"] = list(ctx.args)
    for field, given in (("prefill_vllm_args", prefill_args), ("decode_vllm_args", decode_args)):
        if given is not None:
            try:
                overrides[field] = shlex.split(given)
            except ValueError as e:
                _fail(f"--{field.split('_')[0]}-args {given!r}: {e}")
    if quiet:
        overrides["echo_logs"] = False
    if no_restart:
        overrides["restart"] = False
    try:
        cfg = launch_config.load(config, overrides)
        specs = deploy.child_specs(cfg)
    except ConfigError as e:
        _fail(str(e))
    if dry_run:
        typer.echo(deploy.dry_run_text(specs))
        return
    if deploy.resolve_device(cfg)[0] == "cpu" and (problem := deploy.cpu_install_problem()):
        _fail(problem)
    if cfg.model is None:
        tiny_model.build(None)
    run_dir = cfg.run_dir or deploy.default_run_dir()
    specs = deploy.with_auth_token(specs, cfg.auth_token, run_dir)
    supervisor = Supervisor(
        specs,
        run_dir,
        restart=cfg.restart,
        echo_logs=cfg.echo_logs,
        startup_timeout_s=cfg.startup_timeout_s,
        stop_grace_s=cfg.stop_grace_s,
    )
    shown = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    cache = f", cache tier on tcp://127.0.0.1:{cfg.cache_port}" if cfg.starts_cache else ""
    ready = f"ready: {cfg.prefill}P{cfg.decode}D{cache}, OpenAI endpoint http://{shown}:{cfg.port}/v1 (Ctrl-C stops)"
    raise typer.Exit(supervisor.run(ready_message=ready, warm_up=deploy.warm_up(cfg, supervisor.say)))


@app.command()
def proxy(
    decode: Annotated[list[str], typer.Option(help="Decoder vLLM base URL; repeat or comma-separate.")],
    prefill: Annotated[
        list[str] | None, typer.Option(help="Prefiller vLLM base URL; repeat or comma-separate.")
    ] = None,
    host: Annotated[str, typer.Option(help="Where to listen.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    policy: Annotated[str, typer.Option(help="prefix_aware, least_outstanding or round_robin.")] = "prefix_aware",
    chat_parsing: Annotated[
        bool,
        typer.Option(
            "--chat-parsing",
            help="The instances parse chat answers (--reasoning-parser, --tool-call-parser): the decoder samples a "
            "chat's first token itself instead of continuing after the prefiller's.",
        ),
    ] = False,
    cache: Annotated[
        str | None,
        typer.Option(
            help="The instances' cache server (tcp://HOST:PORT): a request whose prompt it holds, all but a short "
            "tail, skips the prefill hop (a decoder loads it from the tier)."
        ),
    ] = None,
    tier_shortcut_tokens: Annotated[
        int,
        typer.Option(help="The longest tail a decoder computes itself when taking a prompt from the tier (0: never)."),
    ] = 512,
    hint: Annotated[
        list[str] | None,
        typer.Option(
            help="DECODER_URL=tcp://127.0.0.1:PORT: where that decoder takes prefetch hints (its connector's "
            "prefetch_port; on a GPU unless cache_prefetch_gb is 0); a completion going to it alone is passed there "
            "too, so that the prefix of a prompt given as token ids crosses from the tier into the GPU meanwhile. "
            "Repeatable."
        ),
    ] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "warning",
) -> None:
    """The one OpenAI endpoint in front of vLLM instances started elsewhere (xPyD across hosts).

    Prefillers need PDConnector as kv_producer, decoders as kv_consumer (see the README). A
    prefiller computes each request's prompt and first token and hands the prompt's KV to a
    decoder, which generates the rest after that token; the client reads one answer, streamed or
    not. With no prefiller in rotation, decoders prefill themselves.

    Example: pdrun proxy --prefill http://10.0.0.1:8100 --decode http://10.0.0.2:8100,http://10.0.0.3:8100
    """
    from pydantic import ValidationError

    from pdrun.pd.logs import setup_logging
    from pdrun.pd.proxy.app import ProxySettings, serve

    try:
        settings = ProxySettings(
            prefill=_split_urls(prefill),
            decode=_split_urls(decode),
            policy=policy,  # type: ignore[arg-type]
            chat_parsing=chat_parsing,
            cache=cache,
            tier_shortcut_tokens=tier_shortcut_tokens,
            hints=_hints(hint),
        )
    except ValidationError as e:
        err = e.errors()[0]
        _fail(f"{'.'.join(map(str, err['loc']))}: {err['msg']}")
    setup_logging()
    serve(settings, host=host, port=port, log_level=log_level)


def _hints(values: list[str] | None) -> dict[str, str]:
    hints = {}
    for v in values or []:
        url, sep, address = v.partition("=")
        if not sep or not url.strip() or not address.startswith("tcp://"):
            _fail(f"--hint takes DECODER_URL=tcp://HOST:PORT, not {v!r}")
        hints[url.strip()] = address.strip()
    return hints


def _numbers(text: str, what: str, kind: type = int) -> list[Any]:
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        _fail(f"{what} takes comma-separated numbers, not {text!r}")
        raise


def _range(text: str, what: str) -> tuple[int, int]:
    bounds = _numbers(text, what)
    if len(bounds) != 2 or not 0 < bounds[0] <= bounds[1]:
        _fail(f"{what} takes MIN,MAX with 0 < MIN <= MAX, not {text!r}")
    return bounds[0], bounds[1]


def _seconds(text: str, what: str) -> tuple[float, float]:
    bounds = _numbers(text, what, float)
    if len(bounds) != 2 or not 0 <= bounds[0] <= bounds[1]:
        _fail(f"{what} takes MIN,MAX seconds with 0 <= MIN <= MAX, not {text!r}")
    return bounds[0], bounds[1]


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench(
    ctx: typer.Context,
    systems: Annotated[
        str,
        typer.Option(
            help="Systems to compare: plain, offload, lmcache, pdrun-tier, pdrun-1p1d, pdrun-1p1d-tier, "
            "pdrun-XpYd[-tier], plain-dp (one plain vLLM per GPU of the largest PD system, round robin). "
            "A pdrun system takes connector settings after @, to compare settings side by side: "
            "pdrun-1p1d,pdrun-1p1d@chunks_per_frame=1@load_threads=1."
        ),
    ] = "plain,pdrun-tier",
    workloads: Annotated[
        str, typer.Option(help="reuse, multiturn, noreuse, slo, decode (launch/workloads.py says what each sends).")
    ] = "reuse,noreuse",
    model: Annotated[
        str | None,
        typer.Option(
            help="Model path or name (a directory without weights is served with dummy weights); "
            "default: the embedded tiny model."
        ),
    ] = None,
    gpus: Annotated[
        str | None,
        typer.Option(help="GPU ids to use, e.g. 0,1 (default: all). On CPU: how many vLLM instances run at once."),
    ] = None,
    rounds: Annotated[int, typer.Option(help="Rounds of every workload on every system (medians, min, max).")] = 3,
    per_gpu: Annotated[
        int,
        typer.Option(
            help="vLLM instances that may share a GPU, each with 0.9/N of its memory: more systems start "
            "together and are measured in turn (give --gpu-blocks so each one's KV cache is the same)."
        ),
    ] = 1,
    share_gpus: Annotated[
        bool,
        typer.Option(
            "--share-gpus",
            help="Let the instances of one system share a GPU (with --per-gpu): to compare what a cache or a "
            "route saves on fewer GPUs than a deployment has instances, not what more GPUs compute.",
        ),
    ] = False,
    out: Annotated[
        Path,
        typer.Option(
            help="Where results.json, results.md, results.png (rewritten after every measurement) and the logs go."
        ),
    ] = Path("bench-results"),
    gpu_blocks: Annotated[
        int | None, typer.Option(help="vLLM's --num-gpu-blocks-override for every instance (a small GPU cache).")
    ] = None,
    max_model_len: Annotated[int | None, typer.Option(help="vLLM --max-model-len for every instance.")] = None,
    reuse_tokens: Annotated[int, typer.Option(help="reuse: the reused prompt's length.")] = 16384,
    evictors: Annotated[int, typer.Option(help="reuse: prompts of that length sent to evict it.")] = 4,
    hot: Annotated[
        int, typer.Option(min=0, help="reuse: times the prompt is sent again once warm (ttft_hot_s: their median).")
    ] = 5,
    restarts: Annotated[
        int,
        typer.Option(
            min=0,
            help="reuse: full restarts of every system after the rounds, each followed by the prompt once "
            "(a disk tier reloads it where that beats recomputing, the others recompute it); 0: none.",
        ),
    ] = 1,
    conversations: Annotated[int, typer.Option(help="multiturn: conversations (10 users at once).")] = 24,
    think: Annotated[
        str,
        typer.Option(
            help="multiturn: seconds a user reads each answer before the next turn, drawn from MIN,MAX (0,0: "
            "back to back; with a few seconds, conversations leave the GPU cache between turns, as chats do)."
        ),
    ] = "0,0",
    multiturn_system: Annotated[
        int, typer.Option(min=0, help="multiturn: tokens of the system prompt every conversation starts with.")
    ] = 500,
    multiturn_user: Annotated[
        str,
        typer.Option(
            help="multiturn: new user tokens per turn, drawn from MIN,MAX (longer: histories that cost more to "
            "recompute, as with documents or code pasted into a chat)."
        ),
    ] = "120,160",
    lengths: Annotated[str, typer.Option(help="noreuse: prompt lengths.")] = "1024,4096,16384",
    concurrency: Annotated[str, typer.Option(help="noreuse: requests at once.")] = "8,16",
    prompts_per_user: Annotated[
        int, typer.Option(help="noreuse: prompts sent per request at once (each length sends concurrency x this).")
    ] = 2,
    rates: Annotated[str, typer.Option(help="slo: request rates, per second per GPU.")] = "0.5,1,2,4",
    slo_seconds: Annotated[float, typer.Option(help="slo: seconds of arrivals at each rate.")] = 30.0,
    slo_prompt: Annotated[
        str, typer.Option(help="slo: prompt lengths drawn from MIN,MAX (a decode-heavy mix: 1024,4096).")
    ] = "4096,16384",
    slo_output: Annotated[str, typer.Option(help="slo: answer lengths drawn from MIN,MAX.")] = "256,512",
    slo_ttft: Annotated[
        float, typer.Option(min=0.001, help="slo: the TTFT objective, seconds (a request meeting both is good).")
    ] = 2.0,
    slo_tpot_ms: Annotated[
        float, typer.Option(min=0.1, help="slo: the TPOT objective, ms (tighter: where prefills stall decoding).")
    ] = 20.0,
    decode_length: Annotated[
        int, typer.Option(min=1, help="decode: prompt tokens the system holds before the decode is measured.")
    ] = 4096,
    decode_concurrency: Annotated[str, typer.Option(help="decode: requests decoding at once.")] = "8,16,32",
    offload_gb: Annotated[float, typer.Option(help="offload, lmcache: CPU memory for KV, GiB.")] = 40.0,
    cache_cpu_gb: Annotated[float, typer.Option(help="pdrun's cache tier memory, GiB (and a disk tier).")] = 40.0,
    cache_disk_gb: Annotated[
        float | None,
        typer.Option(
            min=0,
            help="pdrun's disk tier, GiB (default: 50, or an equal share of 80% of the space free under --out; "
            "0: none, the tier in memory only, as `pdrun launch` without --cache-dir: a full restart then loses it).",
        ),
    ] = None,
    transport: Annotated[str, typer.Option(help="pdrun's KV transport: tcp or ucx.")] = "tcp",
    enforce_eager: Annotated[
        bool, typer.Option("--enforce-eager", help="No CUDA graphs (not for figures: vLLM's Python bounds it).")
    ] = False,
    kill_decoder: Annotated[
        float | None,
        typer.Option(
            metavar="SECONDS",
            help="Check that a deployment loses no request when a decoder dies and that the decoder comes back: "
            "SECONDS into noreuse and slo, every round, kill one decoder (its vLLM API server, SIGKILL) of each "
            "pdrun system with two decoders or more; its supervisor restarts it. Those systems count failed "
            "requests rather than fail on the first (failed_requests) and report decoder_killed (1; 0 where the "
            "workload ended first) and decoder_rejoined_s (from the kill until it is back in the proxy's rotation; "
            "one not back within the start-up timeout fails the system). Other systems run as usual; the plan says "
            "which get the kill. E.g. --systems pdrun-1p2d --workloads slo,noreuse --kill-decoder 20.",
        ),
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan and its duration; start nothing.")] = False,
) -> None:
    """Compare pdrun with plain vLLM (and its native offload, LMCache) on the same model and GPUs.

    Each system is started, driven by each workload for `--rounds` rounds, interleaved with the
    systems started beside it (A B A B), and stopped; systems that fit on the GPUs together start
    together. Every figure is the median of its rounds, with min and max, and its ratio to `plain`
    of the same run. The plan and its duration are printed first. Arguments after `--` go to every
    vLLM instance.

    Examples:

    * `pdrun bench --dry-run` (the plan, and how long it takes)

    * `pdrun bench --model /models/llama-8b --gpus 0,1 --systems plain,offload,pdrun-tier,pdrun-1p1d
      --workloads reuse,multiturn,noreuse --gpu-blocks 4096`

    * `pdrun bench --model /models/llama-8b --systems pdrun-1p1d,plain-dp --workloads slo`

    * `pdrun bench --model /models/llama-8b --systems plain,pdrun-1p1d --workloads decode` (a decoder's
      TPOT against one plain vLLM decoding the same batch)

    * `pdrun bench --model /models/llama-8b --systems pdrun-1p1d,pdrun-1p1d@chunks_per_frame=1 --workloads slo`
      (the same deployment with one connector setting changed, measured in turn)

    * `pdrun bench --systems pdrun-1p2d --workloads slo,noreuse --kill-decoder 20` (a decoder killed 20 s into
      each workload: failed_requests should be 0, and decoder_rejoined_s says when it was back)
    """
    from pdrun.launch import bench as b
    from pdrun.launch import deploy
    from pdrun.launch import systems as sysmod
    from pdrun.launch import workloads as wl

    names = [n.strip() for n in systems.split(",") if n.strip()]
    chosen = [w.strip() for w in workloads.split(",") if w.strip()]
    visible = deploy.visible_gpus()
    device = "cuda" if visible else "cpu"
    if device == "cuda":
        ids = _numbers(gpus, "--gpus") if gpus else visible
    else:
        ids = list(range(_numbers(gpus, "--gpus")[0] if gpus else 4))
    sizes = b.Sizes(
        reuse=wl.ReuseSizes(tokens=reuse_tokens, evictors=evictors, hot=hot, restarts=restarts),
        multiturn=wl.MultiturnSizes(conversations=conversations, think=_seconds(think, "--think"),
                                    system=multiturn_system, user=_range(multiturn_user, "--multiturn-user")),
        noreuse=wl.NoreuseSizes(lengths=tuple(_numbers(lengths, "--lengths")),
                                concurrency=tuple(_numbers(concurrency, "--concurrency")),
                                prompts_per_user=prompts_per_user),
        slo=wl.SloSizes(rates=tuple(_numbers(rates, "--rates", float)), duration_s=slo_seconds,
                        prompt=_range(slo_prompt, "--slo-prompt"), output=_range(slo_output, "--slo-output"),
                        ttft_s=slo_ttft, tpot_s=slo_tpot_ms / 1000),
        decode=wl.DecodeSizes(length=decode_length,
                              concurrency=tuple(_numbers(decode_concurrency, "--decode-concurrency"))),
    )  # fmt: skip
    if max_model_len is None and model is None:
        max_model_len = 4096  # the tiny model's, as pdrun launch serves it
    context = max_model_len or b.context_length(model)
    if context is not None:
        sizes = sizes.fit(context)
    try:
        p = b.plan(names, chosen, ids, rounds, device, sizes, per_gpu, share_gpus, kill_decoder)
    except (b.BenchError, sysmod.SystemFailure) as e:
        _fail(str(e))
    typer.echo(b.describe(p, sizes))
    if dry_run:
        return
    if model is None:
        model = str(tiny_model.build(None))
    settings = sysmod.Settings(
        model=model,
        device=device,  # type: ignore[arg-type]
        max_model_len=max_model_len,
        gpu_blocks=gpu_blocks,
        gpu_memory_utilization=round(0.9 / per_gpu, 3) if per_gpu > 1 else None,
        offload_gb=offload_gb,
        cache_cpu_gb=cache_cpu_gb,
        cache_disk_gb=cache_disk_gb,
        transport=transport,
        enforce_eager=enforce_eager,
        vllm_args=list(ctx.args),
    )

    def so_far(r: b.Results, f: dict[str, str]) -> None:  # kept if the run stops before its end
        b.write(out, p, settings, sizes, r, f, done=False)

    results, failed = b.run(p, settings, sizes, out, say=typer.echo, measured=so_far)
    b.write(out, p, settings, sizes, results, failed)
    typer.echo((out / "results.md").read_text())
    typer.echo(f"results: {out / 'results.json'}, {out / 'results.md'}, {out / 'results.png'}")


@app.command("cache-server")
def cache_server(
    listen: Annotated[str, typer.Option(help="Where to serve the cache (tcp://HOST:PORT).")] = "tcp://127.0.0.1:15000",
    cpu_gb: Annotated[float, typer.Option(help="Memory tier budget, GiB.")] = 4.0,
    dir: Annotated[Path | None, typer.Option("--dir", help="Disk tier directory; none: memory only.")] = None,
    disk_gb: Annotated[float, typer.Option(help="Disk tier budget, GiB.")] = 50.0,
    metrics_port: Annotated[int | None, typer.Option(help="Serve Prometheus /metrics on this port.")] = None,
    shm_dir: Annotated[
        Path | None, typer.Option(help="Where the memory tier's shared-memory file lives (default /dev/shm).")
    ] = None,
    auth_token: Annotated[
        str | None,
        typer.Option(
            envvar="PDRUN_AUTH_TOKEN",
            show_envvar=True,
            help="A secret every client must give first, others are refused; better in the environment than on a "
            "command line (default: none).",
        ),
    ] = None,
) -> None:
    """The shared KV cache: a memory tier over a disk tier, served to every instance.

    The memory tier is a shared-memory arena of --cpu-gb, allocated at start: instances on this host
    map it and copy chunks in and out of it themselves (on GPUs by DMA); instances on other hosts
    reach it over --listen. Chunks put by any instance are found by all; the disk tier is written
    behind from memory and survives restarts (its index is rebuilt from the files at start; damaged
    files are dropped). Ctrl-C or SIGTERM flushes and stops.

    Example: pdrun cache-server --listen tcp://127.0.0.1:15000 --cpu-gb 8 --dir /var/cache/pdrun --disk-gb 200
    """
    import signal
    import threading

    from pdrun.pd.logs import setup_logging
    from pdrun.storage.arena import PAGE, Arena
    from pdrun.storage.server import CacheServer, serve_metrics
    from pdrun.storage.tiers import DiskTier, MemoryTier, TieredStore

    setup_logging()
    if cpu_gb <= 0 or disk_gb <= 0:
        _fail(f"--cpu-gb and --disk-gb must be > 0, got {cpu_gb} and {disk_gb}")
    gib = 1 << 30
    try:
        memory = MemoryTier(int(cpu_gb * gib), Arena.create(int(cpu_gb * gib) + PAGE, shm_dir))
    except (OSError, ValueError) as e:
        _fail(f"--cpu-gb {cpu_gb:g}: {e}")
    store = TieredStore(memory, DiskTier(dir, int(disk_gb * gib)) if dir else None)
    try:
        server = CacheServer(listen, store, auth_token=auth_token)
    except (OSError, ValueError) as e:
        store.close()
        _fail(f"cannot listen on {listen}: {e}")
    metrics = serve_metrics(store, "127.0.0.1", metrics_port, server.local) if metrics_port is not None else None
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    tiers = f"memory {cpu_gb:g} GiB" + (f", disk {disk_gb:g} GiB in {dir}" if dir else "")
    guard = ", auth token required" if auth_token else ""
    shown = f"cache server on {server.address} ({tiers}{guard})"
    typer.echo(shown + (f", /metrics on {metrics_port}" if metrics else ""))
    stop.wait()
    server.close()
    if metrics is not None:
        metrics.shutdown()
    typer.echo("cache server stopped")


def _ints(option: str, text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(v <= 0 for v in values):
        _fail(f"{option} {text!r}: give positive integers, comma-separated, e.g. 16,64,256")
    return values


def _names(option: str, text: str, allowed: tuple[str, ...]) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in allowed]
    if not values or bad:
        _fail(f"{option} {text!r}: each must be one of {', '.join(allowed)}")
    return values


@profile_app.command("transfer")
def profile_transfer(
    transport: Annotated[str, typer.Option(help="tcp, ucx, or both: tcp,ucx (one line each).")] = "tcp",
    memory: Annotated[
        str, typer.Option(help="host, cuda, or both: where the chunk lives at each end (cuda needs a GPU).")
    ] = "host",
    chunk_tokens: Annotated[str, typer.Option(help="Chunk sizes to sweep, in tokens.")] = "16,64,256,1024",
    model: Annotated[
        Path | None, typer.Option(help="A model's config.json (or its directory): gives the KV bytes per token.")
    ] = None,
    bytes_per_token: Annotated[
        int | None, typer.Option(min=1, help="KV bytes per token, instead of --model (default: Llama-8B, 131072).")
    ] = None,
    peer: Annotated[
        str | None,
        typer.Option(help="A running `pdrun profile peer` (tcp://HOST:PORT or ucx://...); default: one on loopback."),
    ] = None,
    iterations: Annotated[
        int | None, typer.Option(min=1, help="Pulls per size (default: about 1 GiB per size, 10 to 200).")
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write every point here.")] = None,
    plot_out: Annotated[Path | None, typer.Option("--plot", help="Draw latency and GB/s vs chunk size (PNG).")] = None,
) -> None:
    """Latency (p50, p99) and bandwidth of pulling one KV chunk, per chunk size, transport and memory.

    A peer process holds the bytes and answers as a prefiller's endpoint does; each pull is timed
    from request to the last byte in place, checksum verified.

    Example: pdrun profile transfer --transport tcp,ucx --chunk-tokens 16,64,256,1024 --json t.json --plot t.png
    """
    import sys

    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from pdrun.launch import profile_transfer as pt
    from pdrun.transfer import TransferError

    sizes_tokens = _ints("--chunk-tokens", chunk_tokens)
    memories = _names("--memory", memory, pt.MEMORY_KINDS)
    if model is not None and bytes_per_token is not None:
        _fail("give --model or --bytes-per-token, not both")
    if peer is not None:
        schemes = [peer.split("://", 1)[0]]
        if "://" not in peer or schemes[0] not in ("tcp", "ucx"):
            _fail(f"--peer {peer!r}: must be tcp://HOST:PORT or ucx://HOST:PORT")
    else:
        schemes = _names("--transport", transport, ("tcp", "ucx"))
    console = Console(stderr=True)
    points: list[pt.Point] = []
    try:
        bpt = pt.bytes_per_token(model) if model is not None else bytes_per_token or pt.LLAMA_8B_BYTES_PER_TOKEN
        sizes = [(t, t * bpt) for t in sizes_tokens]
        if plot_out is not None:
            pt.check_plot()
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("profiling", total=len(schemes) * len(memories) * len(sizes))

            def done(p: pt.Point) -> None:
                points.append(p)
                progress.update(task, advance=1, description=f"{p.transport}/{p.memory} {p.chunk_tokens} tokens")

            for scheme in schemes:
                for mem in memories:
                    progress.update(task, description=f"{scheme}/{mem}: starting the peer")
                    if peer is not None:
                        pt.measure(peer, mem, sizes, iterations, done)
                    else:
                        with pt.LoopbackPeer(scheme, mem, max(n for _, n in sizes)) as p:
                            pt.measure(p.address, mem, sizes, iterations, done)
        if plot_out is not None:
            pt.plot(points, plot_out)
    except (pt.ProfileError, TransferError) as e:
        _fail(str(e))
    table = Table(title=f"KV chunk pull, {bpt:,} bytes per token")
    for col in ("transport", "memory", "tokens", "MiB", "p50 ms", "p99 ms", "GB/s"):
        table.add_column(col, justify="right")
    for p in points:
        table.add_row(
            p.transport, p.memory, str(p.chunk_tokens), f"{p.chunk_bytes / 2**20:.2f}",
            f"{p.p50_ms:.3f}", f"{p.p99_ms:.3f}", f"{p.gb_per_s:.2f}",
        )  # fmt: skip
    Console().print(table)
    if json_out is not None:
        _write_json(json_out, pt.result_json(points, bpt, " ".join(["pdrun", *sys.argv[1:]])))
    if plot_out is not None:
        typer.echo(f"plot: {plot_out}")


@profile_app.command("peer")
def profile_peer(
    listen: Annotated[str, typer.Option(help="Where to listen: tcp://HOST:PORT or ucx://HOST:PORT.")] = (
        "tcp://127.0.0.1:15200"
    ),
    memory: Annotated[str, typer.Option(help="host or cuda: where the served bytes live.")] = "host",
    max_bytes: Annotated[int, typer.Option(min=1, help="Largest chunk served, bytes (default 256 MiB).")] = 1 << 28,
) -> None:
    """The far end of `pdrun profile transfer --peer URL`: serves chunks of any asked size up to
    --max-bytes, until Ctrl-C. Run it on the decoder's host, profile from the prefiller's.

    Example: pdrun profile peer --listen tcp://0.0.0.0:15200
    """
    from pdrun.launch import profile_transfer as pt
    from pdrun.transfer import TransferError

    try:
        pt.run_peer(listen, memory, max_bytes, lambda address: print(pt.PEER_READY + address, flush=True))
    except (pt.ProfileError, ValueError, OSError, TransferError) as e:
        _fail(f"{listen}: {e}")


@profile_app.command("requests")
def profile_requests(
    url: Annotated[str, typer.Option(help="The pdrun proxy's base URL.")] = "http://127.0.0.1:8000",
    n: Annotated[int, typer.Option("-n", "--requests", min=1, help="Requests per prompt length.")] = 8,
    prompt_tokens: Annotated[str, typer.Option(help="Prompt lengths in tokens, comma-separated.")] = "256,1024",
    max_tokens: Annotated[int, typer.Option(min=1, help="Tokens generated per request.")] = 16,
    stream: Annotated[
        bool, typer.Option(help="Streamed answers give first-token and per-token times; non-streamed, the hand-off.")
    ] = True,
    concurrency: Annotated[int, typer.Option(min=1, help="Requests in flight at once.")] = 1,
    seed: Annotated[
        int | None,
        typer.Option(help="Seed of the random prompts: the same seed sends the same prompts (cached by then)."),
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write every request's timing here.")] = None,
) -> None:
    """Send completions through a running deployment and show where each one's time went: queue,
    prefill, KV hand-off, first decode token and total, per request and as percentiles, from the
    timing the proxy records. The hand-off time is reported in non-streamed answers (--no-stream).

    Example: pdrun profile requests --url http://127.0.0.1:8000 -n 16 --prompt-tokens 512,2048,8192
    """
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from pdrun.launch import profile_requests as pr

    lengths = _ints("--prompt-tokens", prompt_tokens)
    console = Console(stderr=True)
    try:
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("requests", total=n * len(lengths))
            records = pr.run(url, lengths, n, max_tokens, stream, concurrency, seed, lambda _r: progress.advance(task))
    except pr.RequestsError as e:
        _fail(str(e))
    except OSError as e:
        _fail(f"{url}: {e}")
    stats = pr.percentiles(records)
    columns = ("queue", "prefill", "handoff", "first_token", "total")
    table = Table(title=f"{len(records)} requests through {url} (ms; - where not known)")
    for col in ("#", "prompt", "mode", *columns):
        table.add_column(col, justify="right")
    for i, r in enumerate(records):
        mode = r["mode"].split(":")[0]  # the decode-only reason is in the JSON
        table.add_row(str(i), str(r["asked_prompt_tokens"]), mode, *(_ms(r.get(c)) for c in columns))
    for q in pr.PERCENTILES:
        table.add_row(f"p{q}", "", "", *(_ms(stats[c][f"p{q}"]) for c in columns), style="bold")
    Console().print(table)
    typer.echo("first_token: streamed answers only; handoff: non-streamed answers only (--no-stream)")
    if json_out is not None:
        result = {"profile": "requests", "url": url, "stream": stream, "seed": seed, "max_tokens": max_tokens}
        _write_json(json_out, {**result, "requests": records, "percentiles": stats})


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def _write_json(path: Path, data: dict[str, Any]) -> None:
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
    typer.echo(f"json: {path}")


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
