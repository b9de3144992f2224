"""The decode rules over HTTP, with the official `openai` client: `stop` strings (matched across block and token
edges, the text cut before the match, a stream that never shows text past it), `stop_token_ids`, `logprobs` /
`top_logprobs` (the log-probabilities `generate` reports for the same row), `n` (independent choices with
seeds derived from the request's). They are the decode core's rules (runtime/): the server runs the code
`generate` runs."""
import pytest
import torch

import twotower_ext as tt
from twotower_ext.runtime.params import derive_seed

from serving import HTTP, Server, http

if HTTP:
    import openai

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "def "


@pytest.fixture(scope="module")
def shipped():
    lm = tt.load(tt.default_model_path(), dtype=torch.float32)
    srv = Server(lm, "shipped", max_batch=6, max_queue=16, max_len=256)
    yield lm, srv, openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
    srv.close()


def stop_across_a_block_edge(lm, mode="diffusion"):
    """A stop string that straddles the first block's edge (tokens 16 | 17) in the greedy output, and that
    output's text."""
    res = lm.generate(PROMPT, max_new_tokens=48, eos_token_id=None, mode=mode)
    ids = res.new_tokens[0]
    text = lm.decode(ids)
    for cut in (16, 32, 5, 9):   # block edges first (diffusion), then token edges (AR) inside a block
        edge = len(lm.decode(ids[:cut]))
        for w in range(2, 25):
            for left in range(1, w):
                stop = text[edge - left: edge - left + w]
                if len(stop) == w and stop.strip() and text.find(stop) == edge - left:
                    return stop, text
    pytest.fail(f"no stop string straddles a block / token edge where it first occurs in {text!r}")


@http
@pytest.mark.parametrize("mode", ["diffusion", "ar"])
def test_stop_strings_across_block_edges(shipped, mode):
    lm, srv, client = shipped
    stop, text = stop_across_a_block_edge(lm, mode)
    want = text[:text.find(stop)]
    kw = dict(model="shipped", prompt=PROMPT, max_tokens=48, stop=[stop, "\u2603never"],
              extra_body={"mode": mode, "eos_token_id": None})
    r = client.completions.create(**kw)
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    pieces, finish = [], None
    for c in client.completions.create(stream=True, **kw):
        if c.choices:
            pieces.append(c.choices[0].text)
            finish = c.choices[0].finish_reason or finish
            assert stop not in "".join(pieces)           # never past the stop, at any point of the stream
    assert "".join(pieces) == want and finish == "stop"
    off = lm.generate(PROMPT, max_new_tokens=48, eos_token_id=None, mode=mode, stop=[stop])   # generate: the same rule
    assert off.texts[0] == want and off.finish_reasons[0] == "stop"
    assert r.usage.completion_tokens == len(off.new_tokens[0]) < 48


@http
def test_stop_token_ids(shipped):
    lm, srv, client = shipped
    base = lm.generate(PROMPT, max_new_tokens=32, eos_token_id=None)
    stop_id = base.new_tokens[0][20]
    r = client.completions.create(model="shipped", prompt=PROMPT, max_tokens=32,
                                  extra_body={"stop_token_ids": [stop_id], "eos_token_id": None})
    cut = base.new_tokens[0].index(stop_id) + 1
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == cut


@http
@pytest.mark.parametrize("mode", ["diffusion", "ar", "mock_ar"])
def test_logprobs_are_generates(shipped, mode):
    lm, srv, client = shipped
    off = lm.generate(PROMPT, max_new_tokens=20, eos_token_id=None, mode=mode, logprobs=3)
    r = client.completions.create(model="shipped", prompt=PROMPT, max_tokens=20, logprobs=3,
                                  extra_body={"mode": mode, "eos_token_id": None})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 20
    torch.testing.assert_close(torch.tensor(lp.token_logprobs), torch.tensor(off.logprobs[0]), rtol=1e-4, atol=1e-5)
    for got, want in zip(lp.top_logprobs, off.top_logprobs[0]):
        assert len(got) <= 3 and max(got.values()) == pytest.approx(want[0][1], rel=1e-4, abs=1e-5)
    assert all(v <= 0 for v in lp.token_logprobs) and lp.text_offset[0] == 0


@http
def test_streamed_logprobs_follow_their_tokens(shipped):
    lm, srv, client = shipped
    off = lm.generate(PROMPT, max_new_tokens=24, eos_token_id=None, logprobs=0)
    got = []
    for c in client.completions.create(model="shipped", prompt=PROMPT, max_tokens=24, logprobs=0, stream=True,
                                       extra_body={"eos_token_id": None}):
        if c.choices and c.choices[0].logprobs is not None:
            got += c.choices[0].logprobs.token_logprobs
    torch.testing.assert_close(torch.tensor(got), torch.tensor(off.logprobs[0]), rtol=1e-4, atol=1e-5)


@http
def test_n_choices_are_independent_samples_with_derived_seeds(shipped):
    lm, srv, client = shipped
    r = client.completions.create(model="shipped", prompt=PROMPT, max_tokens=16, n=3, temperature=1.0, seed=7,
                                  extra_body={"eos_token_id": None})
    assert [c.index for c in r.choices] == [0, 1, 2] and len({c.text for c in r.choices}) == 3
    for j, c in enumerate(r.choices):
        off = lm.generate(PROMPT, max_new_tokens=16, eos_token_id=None, temperature=1.0, seed=derive_seed(7, j))
        assert c.text == lm.decode(off.new_tokens[0])
    assert r.usage.completion_tokens == 48
    seen = {}
    for c in client.completions.create(model="shipped", prompt=PROMPT, max_tokens=16, n=2, temperature=1.0, seed=7,
                                       stream=True, extra_body={"eos_token_id": None}):
        for ch in c.choices:
            seen[ch.index] = seen.get(ch.index, "") + ch.text
    assert seen == {0: r.choices[0].text, 1: r.choices[1].text}
