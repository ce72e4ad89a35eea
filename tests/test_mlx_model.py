"""The MLX backend's model half against the torch backend (the reference of the math).

Tiny random checkpoints in the official layout (plain and with the 1.7B-style
small_to_mtp_projection), no GPU and no download: teacher-forced talker and code-predictor logits
on rows prefilled anywhere and stepped together, the sampling processors and warpers, greedy
codes of whole utterances through the `Backend` API, random-state snapshots, batched = alone
under seeded sampling, and the phases called from a worker thread as the engine does.

Tolerance of the fp32 logit comparisons: atol = rtol = 1e-4. Both sides run the same ops in the
same order in fp32; what differs is the summation order inside the matrix products and the
attention kernel (MKL/torch vs MLX's CPU kernels), a few ulp per product, measured at ~2e-6 on
logits of magnitude ~4 after the two tiny layers. 1e-4 leaves headroom without hiding a wrong op
(a missing norm, a swapped RoPE half or a wrong mask moves logits by O(1)).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

import torch  # noqa: E402

from engine.backend import BackendError, PrefillRow, ResolvedVoice, StepRow  # noqa: E402
from engine.checkpoint import Checkpoint, load_checkpoint, read_checkpoint_dir  # noqa: E402
from engine.mlx import model as mm  # noqa: E402
from engine.mlx import sampler as ms  # noqa: E402
from engine.mlx.runner import MlxBackend  # noqa: E402
from engine.mlx.weights import load_talker as load_mlx_talker  # noqa: E402
from engine.mlx.weights import talker_shapes  # noqa: E402
from engine.prompt import VoiceSpec, build_prefill, resolve_language, role_ids  # noqa: E402
from engine.sampling import MIN_NEW_TOKENS, SamplingParams  # noqa: E402
from engine.text import TextTokenizer  # noqa: E402
from engine.torch import model as tm  # noqa: E402
from engine.torch import sampler as ts  # noqa: E402
from engine.torch.runner import TorchBackend  # noqa: E402
from engine.torch.weights import load_talker as load_torch_talker  # noqa: E402
from engine.torch.weights import write_random_checkpoint  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL = RTOL = 1e-4
GREEDY = SamplingParams(temperature=0.0, subtalker_temperature=0.0)
SEEDED = SamplingParams(seed=1234)
TEXTS = [
    "Hello there, this is a short test sentence.",
    "A second, different utterance that is a little longer than the first one.",
    "Third.",
]


@pytest.fixture(scope="module", params=["tiny", "tiny-mtp"])
def ckpt(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    path = write_random_checkpoint(tmp_path_factory.mktemp(request.param), request.param, seed=0)
    return read_checkpoint_dir(path)


@pytest.fixture(scope="module")
def tiny(tiny_ckpt: Path) -> Checkpoint:
    return read_checkpoint_dir(tiny_ckpt)


def close(a: torch.Tensor, b: Any) -> None:
    np.testing.assert_allclose(np.array(b), a.detach().numpy(), atol=ATOL, rtol=RTOL)


# ---- weights ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["tiny", "tiny-mtp", "0.6b", "1.7b"])
def test_expected_tensors_are_the_torch_modules(shape: str) -> None:
    cfg = load_checkpoint(f"random:{shape}").config.talker
    with torch.device("meta"):
        ours = tm.Talker(cfg)
    assert talker_shapes(cfg) == {k: tuple(v.shape) for k, v in ours.state_dict().items()}


def test_random_spec_has_the_torch_backends_random_weights() -> None:
    ck = load_checkpoint("random:tiny", random_seed=5)
    theirs = load_torch_talker(ck, torch.device("cpu"), torch.float32)
    ours = load_mlx_talker(ck)
    # end_after_text_ shapes the EOS row of the codec head: the MLX weights must carry it too.
    np.testing.assert_array_equal(
        np.array(ours.codec_head_weight).T, theirs.codec_head.weight.detach().numpy()
    )
    np.testing.assert_array_equal(
        np.array(ours.text_embedding), theirs.model.text_embedding.weight.detach().numpy()
    )
    layer = ours.code_predictor.model.layers[0]
    q = theirs.code_predictor.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    np.testing.assert_array_equal(np.array(layer.qkv)[:, : q.shape[0]].T, q)


def test_bad_checkpoints_are_refused(tiny_ckpt: Path, tmp_path: Path) -> None:
    """A truncated file, a missing tensor and a wrong shape fail the load, naming the problem."""
    import shutil

    from engine.checkpoint import CheckpointError

    state = {k: v for k, v in mx.load(str(tiny_ckpt / "model.safetensors")).items()}
    cases = {
        "truncated": None,
        "missing": {k: v for k, v in state.items() if k != "talker.codec_head.weight"},
        "shape": state | {"talker.codec_head.weight": state["talker.codec_head.weight"][:-1]},
    }
    words = {"truncated": "unreadable", "missing": "missing", "shape": "shape"}
    for name, tensors in cases.items():
        d = tmp_path / name
        shutil.copytree(tiny_ckpt, d)
        if tensors is None:
            data = (d / "model.safetensors").read_bytes()
            (d / "model.safetensors").write_bytes(data[: len(data) // 2])
        else:
            mx.save_safetensors(str(d / "model.safetensors"), tensors)
        with pytest.raises(CheckpointError, match=words[name]):
            load_mlx_talker(read_checkpoint_dir(d))


# ---- teacher-forced logits ----------------------------------------------------------------------


# (rows prefilled, in TEXTS order; the step span; a row that sits out from step 3; layout)
FORCED = {
    "single": ([2], (2, 3), None, True),
    "batched": ([3, 0, 1], (0, 4), 1, True),
    "batched-view-layout": ([3, 0, 1], (0, 4), 1, False),
}


@pytest.mark.parametrize("case", list(FORCED))
def test_teacher_forced_logits_match_torch(ckpt: Checkpoint, tokenizer: TextTokenizer, case: str) -> None:
    """Prompts of different lengths prefilled into arbitrary rows of 4 (one batch), then steps on
    a span of rows (batched: [0, 4), where row 2 is empty and row 1 sits out from step 3); at
    every step the talker logits of each running row and the 15 code-predictor logits of its
    frame match torch, both fed torch's greedy codes (teacher forcing). The view layout is the
    transposed checkpoint weights the GPU reads instead of the CPU's [in, out] copies."""
    rows, (r0, r1), sits_out, contiguous = FORCED[case]
    cfg = ckpt.config.talker
    theirs = load_torch_talker(ckpt, torch.device("cpu"), torch.float32)
    ours = load_mlx_talker(ckpt, contiguous=contiguous)
    n = len(rows)
    prompts = [_prefill_for(ckpt, tokenizer, t).slots for t in TEXTS[:n]]
    with torch.no_grad():
        t_emb = [theirs.embed_slots(p)[0] for p in prompts]
    m_emb = [ours.embed_slots(p) for p in prompts]
    for a, b in zip(t_emb, m_emb, strict=True):
        close(a, b)
    lengths = [e.shape[0] for e in t_emb]
    p_max, hidden = max(lengths), t_emb[0].shape[-1]
    x = torch.zeros(n, p_max, hidden)
    for i, e in enumerate(t_emb):
        x[i, : e.shape[0]] = e
    pos = torch.arange(p_max).expand(n, -1)
    t_cache = tm.TalkerCache(cfg.transformer, 4, 64, torch.device("cpu"), torch.float32)
    m_cache = mm.TalkerCache(cfg.transformer, 4, 64, mx.float32)
    with torch.no_grad():
        th = theirs.forward_hidden(x, pos, tm.PrefillStore(t_cache, torch.tensor(rows)))
    mh = ours.forward_hidden(mx.array(x.numpy()), mx.array(pos.numpy()), m_cache.prefill(rows))
    last_t = th[torch.arange(n), torch.tensor(lengths) - 1]
    last_m = mh[mx.arange(n), mx.array(lengths) - 1]
    close(last_t, last_m)

    row_len = dict.fromkeys(range(4), 0) | dict(zip(rows, lengths, strict=True))
    hid_t = dict(zip(rows, last_t, strict=True))
    hid_m = {r: last_m[i] for i, r in enumerate(rows)}
    text = torch.tensor([[cfg.text_vocab_size - 7]])
    with torch.no_grad():
        add_t = theirs.embed_text(text)[0]
    add_m = ours.embed_text(mx.array(text.numpy()))[0]
    for step in range(6):
        running = [r for r in rows if not (step >= 3 and r == sits_out)]
        # Talker logits of the pending codebook-0, then the frame (code predictor) per row.
        embeds_t, embeds_m = {}, {}
        for r in running:
            with torch.no_grad():
                t_logits = theirs.codec_head(hid_t[r])
            close(t_logits, ours.codec_head(hid_m[r]))
            c0 = int(t_logits.argmax())
            embeds_t[r], embeds_m[r] = _frame_both(theirs, ours, hid_t[r], hid_m[r], c0)
        # One talker step over the whole span: rows not running are computed and discarded.
        xs = torch.zeros(r1 - r0, 1, hidden)
        xs_m = mx.zeros((r1 - r0, 1, hidden))
        for r in running:
            xs[r - r0] = embeds_t[r] + add_t
            xs_m[r - r0] = embeds_m[r] + add_m
        lens = torch.tensor([[row_len[r]] for r in range(r0, r1)])
        with torch.no_grad():
            th = theirs.forward_hidden(xs, lens, t_cache.bind(slice(r0, r1), lens))
        mh = ours.forward_hidden(xs_m, mx.array(lens.numpy()), m_cache.bind(r0, r1, lens.numpy()))
        for r in running:
            close(th[r - r0, 0], mh[r - r0, 0])
            hid_t[r], hid_m[r] = th[r - r0, 0], mh[r - r0, 0]
            row_len[r] += 1


@pytest.mark.parametrize("mode", ["streaming", "full"])
def test_clone_prompt_embeddings_match_torch(ckpt: Checkpoint, tokenizer: TextTokenizer, mode: str) -> None:
    """Base-model prompts: the x-vector slot and the ICL reference frames (16 summed code
    embeddings per frame) embed as torch embeds them."""
    cfg = ckpt.config
    theirs = load_torch_talker(ckpt, torch.device("cpu"), torch.float32)
    ours = load_mlx_talker(ckpt)
    rng = np.random.default_rng(5)
    xvec = rng.standard_normal(cfg.talker.transformer.hidden_size).astype(np.float32)
    ref = rng.integers(0, 2048, (6, 16))
    spec = VoiceSpec(
        name="clone", has_xvector=True, ref_text_ids=tuple(tokenizer.encode("A reference.")), ref_frames=6
    )
    pre = build_prefill(
        cfg, role=role_ids(cfg, tokenizer.encode("assistant\n")), instruct=None, voice=spec, lang_id=None,
        queue=[*spec.ref_text_ids, *tokenizer.encode(TEXTS[0])], mode=mode, text_complete=True,  # type: ignore[arg-type]
    )  # fmt: skip
    assert any(s.ref_frame is not None for s in pre.slots) and any(s.speaker for s in pre.slots)
    with torch.no_grad():
        expected = theirs.embed_slots(pre.slots, torch.from_numpy(xvec), torch.from_numpy(ref))[0]
    close(expected, ours.embed_slots(pre.slots, xvec, ref))


def _frame_both(theirs: tm.Talker, ours: mm.Talker, h_t: torch.Tensor, h_m: Any, c0: int) -> tuple[Any, Any]:
    """One frame through both code predictors, MLX fed torch's greedy codes; logits compared."""
    t_logits: list[torch.Tensor] = []
    with torch.no_grad():
        e0 = theirs.embed_codec(torch.tensor([c0]))
        codes, embs = theirs.code_predictor.predict(
            h_t[None], e0, lambda g, lg: (t_logits.append(lg), lg.argmax(-1))[1]
        )
        frame_t = torch.cat((e0[:, None], embs), dim=1).sum(1)[0]
    m_logits: list[Any] = []

    def forced(g: int, lg: Any) -> Any:
        m_logits.append(lg)
        return mx.array(codes[:, g].numpy())

    e0_m = ours.embed_codec(mx.array([c0]))
    _, embs_m = ours.code_predictor.predict(h_m[None], e0_m, forced)
    frame_m = mx.concatenate((e0_m[:, None], embs_m), axis=1).sum(1)[0]
    assert len(m_logits) == len(t_logits) == 15
    for a, b in zip(t_logits, m_logits, strict=True):
        close(a, b)
    close(frame_t, frame_m)
    return frame_t, frame_m


# ---- sampling pipeline --------------------------------------------------------------------------


def test_processors_and_warpers_match_torch() -> None:
    rng = np.random.default_rng(0)
    b, v, eos = 6, 3072, 2150
    logits = (rng.standard_normal((b, v)) * 3).astype(np.float32)
    seen = rng.random((b, v)) < 0.05
    penalty = np.array([1.05, 1.0, 2.0, 0.5, 1.3, 1.05], dtype=np.float32)
    block = np.array([True, False, True, False, False, True])
    t_s = ts.talker_processors(
        torch.from_numpy(logits), torch.from_numpy(seen), torch.from_numpy(penalty),
        torch.from_numpy(block), ts.suppress_mask(v, eos, "cpu"), eos,
    )  # fmt: skip
    m_s = ms.talker_processors(
        mx.array(logits), mx.array(seen), mx.array(penalty), mx.array(block), ms.suppress_mask(v, eos), eos
    )
    np.testing.assert_array_equal(np.array(m_s), t_s.numpy())  # elementwise ops: bit for bit

    scores = np.array(m_s)
    temperature = np.array([0.9, 0.5, 1.0, 2.0, 0.01, 1.3], dtype=np.float32)
    top_k = np.array([50, 0, 1, 3000, 7, 65536], dtype=np.int64)
    # 1e-9: in fp32 1 - top_p == 1, so every cumulative probability qualifies for removal and
    # only the keep-at-least-one rule leaves the top token.
    top_p = np.array([1.0, 0.9, 0.5, 0.95, 1e-9, 0.3], dtype=np.float32)
    for use_k, use_p in [(True, True), (True, False), (False, True)]:
        t_w = ts.warp(
            torch.from_numpy(scores), torch.from_numpy(temperature), torch.from_numpy(top_k),
            torch.from_numpy(top_p), use_top_k=use_k, use_top_p=use_p,
        )  # fmt: skip
        m_w = np.array(
            ms.warp(
                mx.array(scores), mx.array(temperature), mx.array(top_k), mx.array(top_p),
                use_top_k=use_k, use_top_p=use_p,
            )
        )  # fmt: skip
        kept = np.isfinite(t_w.numpy())
        np.testing.assert_array_equal(np.isfinite(m_w), kept)
        np.testing.assert_allclose(m_w[kept], t_w.numpy()[kept], rtol=1e-6)
        assert kept.sum(axis=1).min() >= 1


def test_sampler_greedy_is_argmax_and_bad_rows_fall_back() -> None:
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((5, 64)).astype(np.float32)
    logits[1, 17] = np.inf  # overflowing logit: softmax is NaN, the row takes its argmax
    logits[2, :] = -np.inf  # every token masked
    logits[3, 5] = np.nan
    # Finite logits that overflow once divided by the temperature: both become +inf, the draw
    # would take the first; the fallback takes the argmax of the unwarped logits.
    logits[4, 3], logits[4, 9] = 1e38, 2e38
    params = [(0.0, 50, 1.0), (0.9, 50, 1.0), (0.9, 0, 0.9), (1.0, 0, 1.0), (0.01, 0, 1.0)]
    rngs = [ms.RowRng(i) for i in range(5)]
    out = np.array(ms.RowSampler(params, rngs)(mx.array(logits)))
    expected = np.array(mx.argmax(mx.array(logits), axis=-1))
    assert out[0] == logits[0].argmax()
    assert out[1] == 17 and out[4] == 9
    np.testing.assert_array_equal(out[1:], expected[1:])  # every bad row: its argmax


def test_rng_snapshot_restore_replays_draws() -> None:
    rng = np.random.default_rng(2)
    logits = mx.array(rng.standard_normal((3, 2048)).astype(np.float32))
    rows = [ms.RowRng(7), ms.RowRng(8), ms.RowRng(9)]
    params = [(1.0, 0, 1.0)] * 3
    snaps = [r.snapshot() for r in rows]
    first = [np.array(ms.RowSampler(params, rows)(logits)) for _ in range(4)]
    assert len({tuple(f) for f in first}) > 1  # the keys advance: later draws differ
    for r, s in zip(rows, snaps, strict=True):
        r.restore(s)
    again = [np.array(ms.RowSampler(params, rows)(logits)) for _ in range(4)]
    np.testing.assert_array_equal(np.stack(first), np.stack(again))


# ---- the Backend API ----------------------------------------------------------------------------


def _prefill_for(ckpt: Checkpoint, tokenizer: TextTokenizer, text: str, voice: str = "ryan") -> Any:
    cfg = ckpt.config
    spec = VoiceSpec(
        name=voice, speaker_id=cfg.talker.spk_id[voice], dialect=cfg.talker.spk_is_dialect.get(voice)
    )
    return build_prefill(
        cfg, role=role_ids(cfg, tokenizer.encode("assistant\n")), instruct=None, voice=spec,
        lang_id=resolve_language(cfg, "english", spec), queue=tokenizer.encode(text), mode="streaming",
        text_complete=True,
    )  # fmt: skip


@dataclass
class Utterance:
    """What the scheduler keeps per stream, for driving a backend by hand."""

    row: int
    queue: list[int]
    state: Any = None
    length: int = 0
    consumed: int = 0
    eos_fed: bool = False
    tokens: int = 0
    c0: int = 0
    frames: list[np.ndarray] = field(default_factory=list)
    done: bool = False


def drive(
    backend: Any,
    ckpt: Checkpoint,
    tokenizer: TextTokenizer,
    jobs: list[tuple[int, str, SamplingParams]],
    max_frames: int,
) -> list[np.ndarray]:
    """Speak each (row, text, sampling) job, all batched, as the scheduler drives a backend:
    one prefill, then predict_codes + talker_step over the span of the rows, the text queue fed
    one id per step, then tts_eos once, then tts_pad. Returns each job's frames [n, 16]."""
    cfg = ckpt.config
    utts, items = [], []
    for row, text, sampling in jobs:
        pre = _prefill_for(ckpt, tokenizer, text)
        u = Utterance(row=row, queue=tokenizer.encode(text), state=backend.new_row_state(sampling))
        u.length, u.consumed, u.eos_fed = len(pre.slots), pre.consumed, pre.eos_fed
        utts.append(u)
        items.append(PrefillRow(u.state, row, row, pre.slots, ResolvedVoice(spec=None)))
    for u, c0 in zip(utts, backend.prefill(items), strict=True):
        u.c0, u.tokens = c0, 1
        u.done = c0 == cfg.talker.codec_eos_id
    while True:
        live = [u for u in utts if not u.done and len(u.frames) < max_frames]
        if not live:
            break
        frames = backend.predict_codes([u.state for u in live], [u.c0 for u in live])
        steps = []
        for u, f in zip(live, frames, strict=True):
            u.frames.append(f)
            if u.consumed < len(u.queue):
                text_id, u.consumed = u.queue[u.consumed], u.consumed + 1
            elif not u.eos_fed:
                text_id, u.eos_fed = cfg.tts_eos_id, True
            else:
                text_id = cfg.tts_pad_id
            steps.append(StepRow(u.state, u.row, text_id, block_eos=u.tokens < MIN_NEW_TOKENS))
        r0, r1 = min(u.row for u in utts), max(u.row for u in utts) + 1
        by_row = {u.row: u.length for u in utts}
        lengths = [by_row.get(r, 0) for r in range(r0, r1)]
        for u, c0 in zip(live, backend.talker_step((r0, r1), lengths, steps), strict=True):
            u.length, u.tokens, u.c0 = u.length + 1, u.tokens + 1, c0
            u.done = c0 == cfg.talker.codec_eos_id
    return [np.array(u.frames).reshape(-1, 16) for u in utts]


def in_thread(fn: Callable[[], Any]) -> Any:
    """Run `fn` in a fresh thread (the engine's worker is not the main thread)."""
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = fn()
        except BaseException as e:  # re-raised in the test's thread
            result["error"] = e

    t = threading.Thread(target=target)
    t.start()
    t.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


def test_greedy_codes_equal_torch_backend(ckpt: Checkpoint, tokenizer: TextTokenizer) -> None:
    """>= 100 greedy frames, three streams batched in rows 2, 0 and 3 (row 1 empty, in the
    span), identical codes from both backends; MLX driven from a worker thread."""
    jobs = [(2, TEXTS[0], GREEDY), (0, TEXTS[1], GREEDY), (3, TEXTS[2], GREEDY)]
    torch_codes = drive(TorchBackend(ckpt, max_streams=4, kv_capacity=192), ckpt, tokenizer, jobs, 110)
    mlx = MlxBackend(ckpt, max_streams=4, kv_capacity=192)
    mlx_codes = in_thread(lambda: drive(mlx, ckpt, tokenizer, jobs, 110))
    assert max(len(c) for c in torch_codes) >= 100
    for a, b in zip(torch_codes, mlx_codes, strict=True):
        np.testing.assert_array_equal(b, a)


def test_batched_equals_alone_under_seeded_sampling(tiny: Checkpoint, tokenizer: TextTokenizer) -> None:
    mlx = MlxBackend(tiny, max_streams=4, kv_capacity=128)
    alone = drive(mlx, tiny, tokenizer, [(0, TEXTS[0], SEEDED)], 40)[0]
    other = SamplingParams(seed=99, temperature=0.7, top_k=0, top_p=0.9)
    batched = in_thread(
        lambda: drive(
            mlx, tiny, tokenizer, [(1, TEXTS[1], other), (2, TEXTS[0], SEEDED), (3, TEXTS[2], GREEDY)], 40
        )
    )
    np.testing.assert_array_equal(batched[1], alone)
    assert len(alone) == 40
    reseeded = drive(mlx, tiny, tokenizer, [(0, TEXTS[0], SamplingParams(seed=1235))], 40)[0]
    assert not np.array_equal(reseeded, alone)  # the seed matters: the comparison can fail


def test_restored_rng_replays_a_failed_phase(tiny: Checkpoint, tokenizer: TextTokenizer) -> None:
    """What the scheduler does after a phase raised: rewind the generators and run it again."""
    mlx = MlxBackend(tiny, max_streams=2, kv_capacity=64)
    state = mlx.new_row_state(SEEDED)
    pre = _prefill_for(tiny, tokenizer, TEXTS[0])
    c0 = mlx.prefill([PrefillRow(state, 0, 0, pre.slots, ResolvedVoice(spec=None))])
    hidden, snap = state.hidden, mlx.rng_states([state])
    first = mlx.predict_codes([state], c0)
    state.hidden = hidden  # a phase that raised would not have consumed it
    drifted = mlx.predict_codes([state], c0)
    mlx.restore_rng([state], snap)
    state.hidden = hidden
    replay = mlx.predict_codes([state], c0)
    np.testing.assert_array_equal(replay, first)
    assert not np.array_equal(drifted, first)


def test_row_state_made_in_another_thread(tiny: Checkpoint, tokenizer: TextTokenizer) -> None:
    """A stream's state is made where the stream opens (a transport's thread) and used by the
    engine's worker; each phase may even run in a thread of its own."""
    mlx = MlxBackend(tiny, max_streams=1, kv_capacity=64)
    state = mlx.new_row_state(SEEDED)
    pre = _prefill_for(tiny, tokenizer, TEXTS[0])
    c0 = in_thread(lambda: mlx.prefill([PrefillRow(state, 0, 0, pre.slots, ResolvedVoice(spec=None))]))
    frames = in_thread(lambda: mlx.predict_codes([state], c0))
    assert frames.shape == (1, 16) and frames[0, 0] == c0[0]
    step = StepRow(state, 0, tiny.config.tts_pad_id, block_eos=False)
    assert len(in_thread(lambda: mlx.talker_step((0, 1), [len(pre.slots)], [step]))) == 1


def test_move_and_grow_keep_the_cache(tiny: Checkpoint, tokenizer: TextTokenizer) -> None:
    """A stream moved to another row (compaction) and a grown cache step exactly as before."""
    jobs = [(2, TEXTS[1], GREEDY)]
    reference = drive(MlxBackend(tiny, max_streams=3, kv_capacity=128), tiny, tokenizer, jobs, 30)[0]

    mlx = MlxBackend(tiny, max_streams=3, kv_capacity=48)
    first = drive(mlx, tiny, tokenizer, jobs, 10)[0]
    # Continue the same stream from row 0 after a grow; the drive helper restarts from a prefill,
    # so compare the caches directly instead: moved and grown rows hold the same keys/values.
    length = 30
    before = [np.array(k[2, :, :length]) for k in mlx.cache.k]
    mlx.move_kv_row(2, 0, length)
    mlx.grow_kv(96)
    assert mlx.kv_capacity == 96 and mlx.cache.k[0].shape[2] == 96
    for k, b in zip(mlx.cache.k, before, strict=True):
        np.testing.assert_array_equal(np.array(k[0, :, :length]), b)
        np.testing.assert_array_equal(np.array(k[2, :, :length]), b)
    np.testing.assert_array_equal(first, reference[:10])
    grown = drive(mlx, tiny, tokenizer, jobs, 30)[0]
    np.testing.assert_array_equal(grown, reference)


def test_cache_refuses_writes_outside_it(tiny: Checkpoint) -> None:
    """MLX scatters are not bounds-checked: a write past the capacity or the rows must raise
    (torch raises IndexError) instead of landing in another row."""
    cache = mm.TalkerCache(tiny.config.talker.transformer, 2, 8, mx.float32)
    with pytest.raises(ValueError):
        cache.bind(0, 2, np.array([[3], [8]]))
    with pytest.raises(ValueError):
        cache.bind(1, 3, np.array([[3], [4]]))
    k = mx.zeros((1, tiny.config.talker.transformer.num_kv_heads, 9, tiny.config.talker.transformer.head_dim))
    with pytest.raises(ValueError):
        cache.prefill([0]).update(0, k, k)
    with pytest.raises(ValueError):
        cache.prefill([2]).update(0, k[:, :, :4], k[:, :, :4])
    cache.bind(0, 2, np.array([[3], [7]]))  # the last position fits


def test_precision_and_device_choices(tiny: Checkpoint, tokenizer: TextTokenizer) -> None:
    with pytest.raises(BackendError):
        MlxBackend(tiny, max_streams=1, kv_capacity=32, precision="int8")
    with pytest.raises(BackendError):
        MlxBackend(tiny, max_streams=1, kv_capacity=32, device="tpu")
    fp32 = MlxBackend(tiny, max_streams=1, kv_capacity=32, device="cpu")
    assert fp32.describe() == {
        "backend": "mlx", "device": "cpu", "precision": "fp32", "kernels": {"talker": "fp32", "codec": "fp32"},
    }  # fmt: skip
    bf16 = MlxBackend(tiny, max_streams=1, kv_capacity=32, device="cpu", precision="bf16")
    assert bf16.precision == "bf16" and bf16.talker.codec_head_weight.dtype == mx.bfloat16
    codes = drive(bf16, tiny, tokenizer, [(0, TEXTS[2], GREEDY)], 8)[0]
    assert codes.shape[1] == 16 and (codes >= 0).all() and (codes[:, 1:] < 2048).all()


# ---- codec rows and cloning through the backend -------------------------------------------------


def test_codec_rows_and_icl_prime_through_the_backend(tiny: Checkpoint, tokenizer: TextTokenizer) -> None:
    """An ICL prime given at prefill is heard before the row's first frame; a later prefill into
    the same row resets it. Driven from a worker thread (the codec rows were made in this one)."""
    from engine.mlx.codec import CodecStreams, load_codec_decoder

    rng = np.random.default_rng(3)
    ref = rng.integers(0, 2048, (5, 16))
    codes = rng.integers(0, 2048, (2, 16, 3))
    slots = _prefill_for(tiny, tokenizer, TEXTS[2]).slots
    mlx = MlxBackend(tiny, max_streams=3, kv_capacity=64)

    def run() -> tuple[np.ndarray, np.ndarray]:
        icl = ResolvedVoice(spec=None, ref_codes=ref)
        mlx.prefill([PrefillRow(mlx.new_row_state(GREEDY), 1, 1, slots, icl)])
        first = mlx.decode([1, 0], codes)
        mlx.prefill([PrefillRow(mlx.new_row_state(GREEDY), 1, 1, slots, ResolvedVoice(spec=None))])
        return first, mlx.decode([1], codes[:1])

    first, fresh = in_thread(run)
    streams = CodecStreams(load_codec_decoder(tiny), 3)
    streams.prime(1, mx.array(ref.T))
    np.testing.assert_array_equal(first, np.array(streams.decode([1, 0], mx.array(codes))))
    streams.reset(1)
    np.testing.assert_array_equal(fresh, np.array(streams.decode([1], mx.array(codes[:1]))))
    assert first.dtype == np.float32 and first.shape == (2, 3 * 1920)


def test_clone_encode_from_any_thread(tmp_path_factory: pytest.TempPathFactory) -> None:
    from engine.mlx.codec_encoder import load_codec_encoder
    from engine.mlx.speaker import extract_xvector, load_speaker_encoder

    base = read_checkpoint_dir(write_random_checkpoint(tmp_path_factory.mktemp("tiny-base"), "tiny", "base"))
    mlx = MlxBackend(base, max_streams=1, kv_capacity=32)
    wav = (0.1 * np.random.default_rng(4).standard_normal(24000)).astype(np.float32)
    xvec, codes = in_thread(lambda: mlx.clone_encode(wav, with_codes=True))  # loads the encoders there
    again, none = in_thread(lambda: mlx.clone_encode(wav, with_codes=False))  # another thread uses them
    assert none is None and codes is not None
    np.testing.assert_array_equal(again, xvec)
    np.testing.assert_array_equal(xvec, extract_xvector(load_speaker_encoder(base), wav))
    np.testing.assert_array_equal(codes, load_codec_encoder(base).encode(wav))
    assert xvec.dtype == np.float32 and codes.dtype == np.int64 and codes.shape == (13, 16)
