"""The decoder's continuation after the prefiller's first token: which requests take it, what
each side is asked, and the answer the client reads, streamed or not, as one vLLM gives it."""

from __future__ import annotations

import json
import random

import pytest

from pdrun.pd.proxy.continuation import CHAT, COMPLETIONS, Continuation, Relayed, inexact_reason, prefill_body

PROMPT = [1, 2, 3]


def completion_answer(text="ab", finish="length", ids=(42,), logprobs=None, stop_reason=None):
    """A prefiller's non-streamed completion with return_token_ids, as vLLM gives it."""
    choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish, "stop_reason": stop_reason,
              "prompt_token_ids": PROMPT, "token_ids": list(ids)}  # fmt: skip
    return {"id": "cmpl-p", "object": "text_completion", "created": 7, "model": "m", "choices": [choice],
            "usage": {"prompt_tokens": 3, "total_tokens": 4, "completion_tokens": 1},
            "kv_transfer_params": {"do_remote_prefill": True}}  # fmt: skip


def chat_answer(text="ab", finish="length"):
    message = {"role": "assistant", "content": text, "refusal": None, "tool_calls": []}
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish, "stop_reason": None,
              "token_ids": [42]}  # fmt: skip
    return {"id": "chatcmpl-p", "object": "chat.completion", "created": 7, "model": "m", "choices": [choice],
            "system_fingerprint": "fp", "usage": {"prompt_tokens": 3, "total_tokens": 4, "completion_tokens": 1},
            "prompt_token_ids": PROMPT, "kv_transfer_params": {"do_remote_prefill": True}}  # fmt: skip


def decoder_answer(text="cd", ids=(9, 10), finish="length", logprobs=None):
    """The decoder's non-streamed completion of PROMPT + [42]."""
    choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish, "stop_reason": None,
              "prompt_token_ids": [*PROMPT, 42], "token_ids": list(ids)}  # fmt: skip
    usage = {"prompt_tokens": 4, "total_tokens": 6, "completion_tokens": 2}
    return {"id": "cmpl-d", "choices": [choice], "usage": usage, "kv_transfer_params": None}


def events(raw: bytes) -> tuple[list[dict], bool]:
    """The JSON events of an SSE byte string, and whether it ended with [DONE]."""
    parts = raw.split(b"\n\n")
    assert parts[-1] == b""
    done = parts[-2] == b"data: [DONE]"
    return [json.loads(p.removeprefix(b"data: ")) for p in parts[: -2 if done else -1]], done


@pytest.mark.parametrize(
    ("path", "body", "reason"),
    [
        (COMPLETIONS, {"prompt": "x"}, None),
        (COMPLETIONS, {"prompt": "x", "logprobs": 2, "echo": True}, None),  # joined by the proxy
        (COMPLETIONS, {"prompt": "x", "seed": 3, "temperature": 0}, None),
        (COMPLETIONS, {"prompt": "x", "seed": 3, "temperature": 0.8}, "seeded sampling"),
        (COMPLETIONS, {"prompt": "x", "seed": 3}, "seeded sampling"),  # vLLM's default temperature samples
        (COMPLETIONS, {"prompt": "x", "structured_outputs": {"json": {}}}, "structured_outputs"),
        (COMPLETIONS, {"prompt": "x", "response_format": {"type": "json_object"}}, "response_format"),
        (COMPLETIONS, {"prompt": "x", "response_format": {"type": "text"}}, None),
        (COMPLETIONS, {"prompt": "x", "presence_penalty": 0.5}, "presence or frequency penalty"),
        (COMPLETIONS, {"prompt": "x", "presence_penalty": 0, "repetition_penalty": 1.2}, None),  # prompt and output
        (COMPLETIONS, {"prompt": "x", "bad_words": ["no"]}, "bad_words"),
        (COMPLETIONS, {"prompt": "x", "truncate_prompt_tokens": 100}, None),  # the prefiller's ids are truncated
        (CHAT, {"messages": []}, None),
        (CHAT, {"messages": [], "logprobs": True, "top_logprobs": 2}, "chat logprobs"),
        (CHAT, {"messages": [], "tools": [{"type": "function"}]}, "tools"),
        (CHAT, {"messages": [], "tools": [{"type": "function"}], "tool_choice": "none"}, None),
        (CHAT, {"messages": [], "echo": True}, "chat echo"),
    ],
)
def test_which_requests_the_decoder_continues_exactly(path, body, reason):
    assert inexact_reason(path, body) == reason


def test_the_prefiller_is_asked_for_the_first_token_as_one_vllm_gives_it():
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True,
            "stream_options": {"include_usage": True}, "max_completion_tokens": 100, "min_tokens": 10,
            "logprobs": True, "top_logprobs": 3, "temperature": 0.7}  # fmt: skip
    assert prefill_body(CHAT, body) == {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": False,
        "max_tokens": 1,
        "min_tokens": 1,  # no end of sequence first, as the client's min_tokens says
        "logprobs": True,  # the first token's, the client's
        "top_logprobs": 3,
        "temperature": 0.7,
        "return_token_ids": True,
        "kv_transfer_params": {"do_remote_decode": True},
    }
    assert body["max_completion_tokens"] == 100 and body["stream"] is True  # the client's request as it was
    # One token asked for: the prefiller's answer is all of it, nothing is staged.
    assert prefill_body(COMPLETIONS, {"prompt": "x", "max_tokens": 1})["kv_transfer_params"] == {
        "do_remote_decode": False
    }
    assert prefill_body(CHAT, {"messages": [], "max_tokens": 5, "max_completion_tokens": 1})["kv_transfer_params"] == {
        "do_remote_decode": False
    }


@pytest.mark.parametrize(
    ("answer", "body", "final"),
    [
        (completion_answer(), {"max_tokens": 5}, False),
        (completion_answer(finish="stop"), {"max_tokens": 5}, True),  # an end of sequence or a stop string
        (completion_answer(), {"max_tokens": 1}, True),
        (completion_answer(), {}, False),  # vLLM's default of 16
        (chat_answer(), {"max_completion_tokens": 1, "max_tokens": 9}, True),
        (chat_answer(), {}, False),
    ],
)
def test_a_prefiller_that_stopped_gave_the_whole_answer(answer, body, final):
    path = COMPLETIONS if answer["object"] == "text_completion" else CHAT
    assert Continuation(path, body, answer).final is final


@pytest.mark.parametrize(
    ("text", "body", "why"),
    [
        ("ab", {}, None),
        ("\ufffd", {}, "first token not whole text"),  # part of a UTF-8 sequence
        ("", {}, "first token not whole text"),
        ("x\n", {"stop": ["\n\n"]}, "a stop string could start in the first token"),
        ("ab", {"stop": "bc"}, "a stop string could start in the first token"),
        ("ab", {"stop": ["zz", "b"]}, None),  # a whole stop string in it: the prefiller stopped
    ],
)
def test_a_first_token_the_decoder_cannot_continue_after_is_named(text, body, why):
    assert Continuation(COMPLETIONS, body, completion_answer(text=text)).inexact() == why


@pytest.mark.parametrize(
    "answer",
    [
        {"choices": [{"text": "a", "finish_reason": "length"}]},  # no token ids: not this vLLM's answer
        {"choices": []},
        {"choices": [{"text": "a", "finish_reason": "length", "token_ids": [1, 2], "prompt_token_ids": [1]}]},
    ],
)
def test_an_answer_without_the_first_token_is_refused(answer):
    with pytest.raises(ValueError, match="prefiller"):
        Continuation(COMPLETIONS, {}, answer)


def test_the_decoder_continues_a_completion_after_the_first_token():
    body = {"model": "m", "prompt": "hello", "stream": True, "min_tokens": 3, "stop": ["zz"], "echo": True,
            "truncate_prompt_tokens": 2, "logprobs": 1}  # fmt: skip
    d = Continuation(COMPLETIONS, body, completion_answer()).decoder_body({"do_remote_prefill": True})
    assert d == {"model": "m", "prompt": [1, 2, 3, 42], "stream": True, "min_tokens": 2, "stop": ["zz"],
                 "logprobs": 1, "max_tokens": 15, "kv_transfer_params": {"do_remote_prefill": True}}  # fmt: skip
    assert Continuation(COMPLETIONS, {"max_tokens": None}, completion_answer()).decoder_body({})["max_tokens"] is None


def test_the_decoder_continues_a_chat_as_a_completion_of_its_token_ids():
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 20,
            "max_tokens": 99, "tools": [], "chat_template_kwargs": {"x": 1}, "add_generation_prompt": True,
            "return_token_ids": True, "stream": False, "temperature": 0, "stop": "\n\n\n", "top_k": 3}  # fmt: skip
    d = Continuation(CHAT, body, chat_answer()).decoder_body({})
    assert d == {"model": "m", "prompt": [1, 2, 3, 42], "max_tokens": 19, "return_token_ids": True, "stream": False,
                 "temperature": 0, "stop": "\n\n\n", "top_k": 3, "kv_transfer_params": {}}  # fmt: skip
    assert Continuation(CHAT, {"messages": []}, chat_answer()).decoder_body({})["max_tokens"] is None


def test_a_whole_completion_joins_text_ids_logprobs_and_usage():
    first_lp = {"text_offset": [0], "token_logprobs": [-1.0], "tokens": ["ab"], "top_logprobs": [{"ab": -1.0}]}
    rest_lp = {"text_offset": [0, 1], "token_logprobs": [-2.0, -3.0], "tokens": ["c", "d"],
               "top_logprobs": [{"c": -2.0}, {"d": -3.0}]}  # fmt: skip
    body = {"prompt": "x", "return_token_ids": True, "logprobs": 0}
    c = Continuation(COMPLETIONS, body, completion_answer(logprobs=first_lp))
    out = c.whole(decoder_answer(logprobs=rest_lp))
    choice = out["choices"][0]
    assert out["id"] == "cmpl-p" and out["kv_transfer_params"] is None
    assert choice["text"] == "abcd" and choice["token_ids"] == [42, 9, 10] and choice["prompt_token_ids"] == PROMPT
    assert choice["logprobs"] == {
        "text_offset": [0, 2, 3],  # the decoder's after the first token's text
        "token_logprobs": [-1.0, -2.0, -3.0],
        "tokens": ["ab", "c", "d"],
        "top_logprobs": [{"ab": -1.0}, {"c": -2.0}, {"d": -3.0}],
    }
    assert out["usage"] == {"prompt_tokens": 3, "total_tokens": 6, "completion_tokens": 3}
    # Ids only where the client asked for them; the prefiller's own answer, when it is all of it.
    plain = Continuation(COMPLETIONS, {"prompt": "x"}, completion_answer()).whole(decoder_answer())
    assert plain["choices"][0]["token_ids"] is None and plain["choices"][0]["prompt_token_ids"] is None
    alone = Continuation(COMPLETIONS, {"prompt": "x"}, completion_answer(finish="stop", stop_reason=4)).whole()
    assert alone["choices"][0]["text"] == "ab" and alone["choices"][0]["finish_reason"] == "stop"
    assert alone["usage"]["completion_tokens"] == 1 and alone["kv_transfer_params"] is None


def test_a_whole_chat_answer_is_the_prefillers_message_with_the_decoders_text():
    out = Continuation(CHAT, {"messages": []}, chat_answer()).whole(decoder_answer(text="cd", finish="stop"))
    choice = out["choices"][0]
    assert out["object"] == "chat.completion" and out["id"] == "chatcmpl-p" and out["system_fingerprint"] == "fp"
    assert choice["message"] == {"role": "assistant", "content": "abcd", "refusal": None, "tool_calls": []}
    assert choice["finish_reason"] == "stop" and choice["token_ids"] is None and out["prompt_token_ids"] is None
    assert out["usage"] == {"prompt_tokens": 3, "total_tokens": 6, "completion_tokens": 3}
    with_ids = Continuation(CHAT, {"messages": [], "return_token_ids": True}, chat_answer()).whole(decoder_answer())
    assert with_ids["choices"][0]["token_ids"] == [42, 9, 10] and with_ids["prompt_token_ids"] == PROMPT


def test_a_streamed_completion_starts_with_the_first_token_and_goes_on_with_the_decoders():
    body = {"prompt": "x", "stream": True, "return_token_ids": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}  # fmt: skip
    lp = {"text_offset": [0], "token_logprobs": [-1.0], "tokens": ["ab"], "top_logprobs": [{"ab": -1.0}]}
    c = Continuation(COMPLETIONS, body, completion_answer(logprobs=lp))
    head, done = events(c.head())
    assert not done and len(head) == 1
    assert head[0]["choices"] == [{"index": 0, "text": "ab", "logprobs": lp, "finish_reason": None,
                                   "stop_reason": None, "prompt_token_ids": PROMPT, "token_ids": [42]}]  # fmt: skip
    assert head[0]["usage"] == {"prompt_tokens": 3, "total_tokens": 4, "completion_tokens": 1}
    rest_lp = {"text_offset": [0], "token_logprobs": [-2.0], "tokens": ["c"], "top_logprobs": [{"c": -2.0}]}
    first = {"id": "cmpl-d", "object": "text_completion", "created": 8, "model": "m",
             "choices": [{"index": 0, "text": "c", "logprobs": rest_lp, "finish_reason": None,
                          "prompt_token_ids": [*PROMPT, 42], "token_ids": [9]}],
             "usage": {"prompt_tokens": 4, "total_tokens": 5, "completion_tokens": 1}}  # fmt: skip
    out = c.rewrite(first)
    assert out["id"] == "cmpl-p" and out["created"] == 7
    assert out["choices"][0]["prompt_token_ids"] is None and out["choices"][0]["token_ids"] == [9]
    assert out["choices"][0]["logprobs"]["text_offset"] == [2]  # after the first token's text
    assert out["usage"] == {"prompt_tokens": 3, "total_tokens": 5, "completion_tokens": 2}
    error = {"error": {"message": "boom"}}
    assert c.rewrite(error) == error


def streamed(*tokens: tuple[int, str]) -> Relayed:
    """A decoder's stream of these (token id, text) events, as the proxy relayed it."""
    r = Relayed()
    for token, text in tokens:
        r.see({"choices": [{"index": 0, "text": text, "token_ids": [token], "finish_reason": None}]})
    return r


def test_a_stream_whose_decoder_died_goes_on_after_the_tokens_it_streamed():
    body = {"prompt": "x", "stream": True, "max_tokens": 6, "min_tokens": 4, "logprobs": 0,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}  # fmt: skip
    lp = {"text_offset": [0], "token_logprobs": [-1.0], "tokens": ["ab"], "top_logprobs": [{"ab": -1.0}]}
    c = Continuation(COMPLETIONS, body, completion_answer(logprobs=lp))
    assert c.decoder_body({"do_remote_prefill": True}, read_ids=True)["return_token_ids"] is True
    # The first decoder streamed "c" and "de" (ids 9, 10) before it died: the next one continues
    # the prompt, the first token and those, without a hand-off, for what is left.
    again = c.resumed(streamed((9, "c"), (10, "de")))
    assert again == {"prompt": [1, 2, 3, 42, 9, 10], "stream": True, "max_tokens": 3, "min_tokens": 1,
                     "logprobs": 0, "stream_options": body["stream_options"], "return_token_ids": True}  # fmt: skip
    # Its events read as the answer's next: offsets after "abcde", usage counting those as output,
    # and no ids where the client did not ask for them.
    event = {"choices": [{"index": 0, "text": "f", "finish_reason": None, "prompt_token_ids": [1, 2, 3, 42, 9, 10],
                          "token_ids": [11], "logprobs": {"text_offset": [0], "token_logprobs": [-2.0],
                                                          "tokens": ["f"], "top_logprobs": [{"f": -2.0}]}}],
             "usage": {"prompt_tokens": 6, "total_tokens": 7, "completion_tokens": 1}}  # fmt: skip
    out = c.rewrite(event)
    assert out["choices"][0]["logprobs"]["text_offset"] == [5]
    assert out["choices"][0]["token_ids"] is None and out["choices"][0]["prompt_token_ids"] is None
    assert out["usage"] == {"prompt_tokens": 3, "total_tokens": 7, "completion_tokens": 4}
    # Once more: after the tokens of both decoders.
    assert c.resumed(streamed((11, "f")))["prompt"] == [1, 2, 3, 42, 9, 10, 11]


def test_tokens_whose_text_was_held_back_are_sampled_again_and_their_ids_not_sent_twice():
    body = {"prompt": "x", "stream": True, "max_tokens": 8, "return_token_ids": True}
    c = Continuation(COMPLETIONS, body, completion_answer())
    # "c", then the two first bytes of a character of three: no text yet for ids 10 and 11.
    again = c.resumed(streamed((9, "c"), (10, ""), (11, "")))
    assert again["prompt"] == [1, 2, 3, 42, 9] and again["max_tokens"] == 6
    # The next decoder samples 10 and 11 again; the client has their ids, and gets the character.
    first = c.rewrite({"choices": [{"index": 0, "text": "", "token_ids": [10], "finish_reason": None}]})
    second = c.rewrite({"choices": [{"index": 0, "text": "\u20ac", "token_ids": [11, 12], "finish_reason": None}]})
    third = c.rewrite({"choices": [{"index": 0, "text": "d", "token_ids": [13], "finish_reason": None}]})
    assert [e["choices"][0]["token_ids"] for e in (first, second, third)] == [[], [12], [13]]
    assert second["choices"][0]["text"] == "\u20ac"


def test_the_next_decoders_text_goes_on_exactly_where_the_clients_stopped():
    """vLLM's detokenizer (tokenizers' DecodeStream, primed with the prompt): a byte-level BPE's
    tokens taken at random, so that many a stream dies inside a character of several bytes. The
    text the client had, then what a decoder primed with the prompt and the tokens kept gives
    for the rest, is the whole answer's text, wherever the stream died."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["price 5 \u20ac, caf\u00e9 cr\u00e8me \u4e2d\u6587 \U0001f600 ok"] * 50, trainer)
    rng = random.Random(7)

    def texts(prompt: list[int], output: list[int]) -> list[str]:
        stream = decoders.DecodeStream(ids=prompt, skip_special_tokens=True)
        return [stream.step(tok, t) or "" for t in output]

    for _ in range(200):
        prompt, output = [rng.randrange(400) for _ in range(5)], [rng.randrange(400) for _ in range(20)]
        whole = texts(prompt, output)
        for died in range(1, len(output)):
            relayed = Relayed()
            for token, text in zip(output[:died], whole[:died], strict=True):
                relayed.see({"choices": [{"text": text, "token_ids": [token]}]})
            kept = died - relayed.held
            rest = texts(prompt + output[:kept], output[kept:])
            assert relayed.text + "".join(rest) == "".join(whole)


@pytest.mark.parametrize(
    "body, tokens",
    [
        ({"max_tokens": 3}, [(9, "c"), (10, "d")]),  # it had streamed the whole answer
        ({"stop": ["b\n\n", "xyz"]}, [(9, "cx")]),  # the answer ends on the start of a stop string
        ({"stop": "d\n"}, [(9, "c"), (10, "d")]),
        ({"logprobs": 1}, [(9, "c"), (10, "")]),  # a token to sample again whose logprobs the client has
    ],
)
def test_a_stream_that_could_not_go_on_as_one_vllms_answer_is_not_resumed(body, tokens):
    c = Continuation(COMPLETIONS, {"prompt": "x", "stream": True, **body}, completion_answer())
    assert c.resumed(streamed(*tokens)) is None


def test_a_streamed_chat_opens_with_the_role_then_the_first_token():
    body = {"messages": [], "stream": True, "stream_options": {"include_usage": True}}
    c = Continuation(CHAT, body, chat_answer())
    head, done = events(c.head())
    assert not done and [e["object"] for e in head] == ["chat.completion.chunk"] * 2
    assert head[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert head[1]["choices"][0]["delta"] == {"content": "ab"} and head[1]["choices"][0]["finish_reason"] is None
    last = c.rewrite({"id": "cmpl-d", "choices": [{"index": 0, "text": "d", "finish_reason": "length",
                                                   "stop_reason": None, "token_ids": None}]})  # fmt: skip
    assert last["id"] == "chatcmpl-p" and last["object"] == "chat.completion.chunk"
    assert last["choices"] == [{"index": 0, "delta": {"content": "d"}, "logprobs": None, "finish_reason": "length",
                                "stop_reason": None, "token_ids": None}]  # fmt: skip
    usage = c.rewrite({"id": "cmpl-d", "choices": [], "system_fingerprint": "fp",
                       "usage": {"prompt_tokens": 4, "total_tokens": 6, "completion_tokens": 2}})  # fmt: skip
    assert usage["choices"] == [] and usage["system_fingerprint"] == "fp"
    assert usage["usage"] == {"prompt_tokens": 3, "total_tokens": 6, "completion_tokens": 3}


def test_a_prefiller_that_stopped_streams_the_whole_answer_and_the_end():
    body = {"messages": [], "stream": True, "stream_options": {"include_usage": True}}
    head, done = events(Continuation(CHAT, body, chat_answer(text="", finish="stop")).head())
    assert done and len(head) == 3
    assert head[1]["choices"][0]["finish_reason"] == "stop" and head[1]["choices"][0]["stop_reason"] is None
    assert head[2]["choices"] == [] and head[2]["usage"]["completion_tokens"] == 1
    head, done = events(Continuation(COMPLETIONS, {"stream": True}, completion_answer(finish="stop")).head())
    assert done and len(head) == 1 and head[0]["choices"][0]["finish_reason"] == "stop"


def test_chats_are_not_continued_where_vllm_parses_their_answers():
    assert inexact_reason(CHAT, {"messages": []}, chat_parsing=True) == "chat answers parsed by vLLM"
    assert inexact_reason(COMPLETIONS, {"prompt": "x"}, chat_parsing=True) is None
