"""Our talker, code predictor, prompt layouts and sampling pipeline against the official qwen-tts.

Random tiny models in the released layout (one with the 1.7B-style small_to_mtp_projection);
the official model gets exactly our weights. Compared: checkpoint key layout, the prefill
embeddings of every CustomVoice/VoiceDesign layout, talker and code-predictor logits at every
step under teacher forcing, and the processed logits of the sampling pipeline.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from oracle import qwen_tts

from engine.checkpoint import random_config_dicts
from engine.config import ModelConfig
from engine.prompt import VoiceSpec, build_prefill, instruct_ids, resolve_language, role_ids
from engine.text import TextTokenizer
from engine.torch.model import Talker, TalkerCache
from engine.torch.sampler import talker_processors, warp
from engine.torch.weights import init_random_

pytestmark = pytest.mark.oracle

TEXT = [9707, 11, 1879, 13, 2585, 525, 498, 3351, 30]  # "Hello, world. How are you today?"


class _Captured(Exception):
    pass


def make_pair(shape: str, model_type: str, seed: int = 0) -> tuple[Any, Talker, ModelConfig]:
    qwen_tts()
    from qwen_tts.core.models import Qwen3TTSConfig, Qwen3TTSForConditionalGeneration

    d = random_config_dicts(shape, model_type)["config.json"]
    cfg = ModelConfig.from_dict(d)
    ours = init_random_(Talker(cfg.talker), seed).eval()
    official = Qwen3TTSForConditionalGeneration(Qwen3TTSConfig(**d)).eval()
    official.talker.load_state_dict(ours.state_dict(), strict=True)
    return official, ours, cfg


@pytest.fixture(scope="module", params=["tiny", "tiny-mtp"])
def pair(request: pytest.FixtureRequest) -> tuple[Any, Talker, ModelConfig]:
    return make_pair(request.param, "custom_voice")


def official_prompt(official: Any, **kw: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The (inputs_embeds, trailing_text_hidden) the official generate hands to talker.generate."""
    seen: dict[str, torch.Tensor] = {}

    def grab(**kwargs: Any) -> None:
        seen.update(kwargs)
        raise _Captured

    orig = official.talker.generate
    official.talker.generate = grab
    try:
        with pytest.raises(_Captured):
            official.generate(**kw)
    finally:
        official.talker.generate = orig
    return seen["inputs_embeds"], seen["trailing_text_hidden"]


def template(text: list[int]) -> torch.Tensor:
    return torch.tensor([[151644, 77091, 198, *text, 151645, 198, 151644, 77091, 198]])


@pytest.mark.parametrize("shape", ["tiny", "tiny-mtp", "0.6b", "1.7b"])
def test_checkpoint_layout_matches_official(shape: str) -> None:
    qwen_tts()
    from qwen_tts.core.models import Qwen3TTSConfig, Qwen3TTSForConditionalGeneration

    d = random_config_dicts(shape, "custom_voice")["config.json"]
    with torch.device("meta"):
        official = Qwen3TTSForConditionalGeneration(Qwen3TTSConfig(**d))
        ours = Talker(ModelConfig.from_dict(d).talker)
    theirs = {k: tuple(v.shape) for k, v in official.state_dict().items()}
    mine = {f"talker.{k}": tuple(v.shape) for k, v in ours.state_dict().items()}
    assert mine == theirs


CASES = [
    # (name, language, speaker, instruct, model_type)
    ("cv-auto", "auto", "ryan", None, "custom_voice"),
    ("cv-english", "english", "ryan", None, "custom_voice"),
    ("cv-dialect-chinese", "chinese", "dylan", None, "custom_voice"),
    ("cv-dialect-auto", "auto", "eric", None, "custom_voice"),
    ("cv-dialect-english", "English", "eric", None, "custom_voice"),
    ("cv-instruct", "english", "serena", "Speak slowly and warmly.", "custom_voice"),
    ("vd-instruct", "english", None, "A deep, calm male voice.", "voice_design"),
    ("vd-auto-no-instruct", "auto", None, None, "voice_design"),
]


@pytest.mark.parametrize("mode", ["streaming", "full"])
@pytest.mark.parametrize(
    ("name", "language", "speaker", "instruct", "model_type"), CASES, ids=[c[0] for c in CASES]
)
def test_prefill_embeddings_match_official(
    tokenizer: TextTokenizer,
    name: str,
    language: str,
    speaker: str | None,
    instruct: str | None,
    model_type: str,
    mode: str,
) -> None:
    official, ours, cfg = make_pair("tiny-mtp", model_type, seed=3)
    kw: dict[str, Any] = dict(
        input_ids=[template(TEXT)], languages=[language], speakers=[speaker],
        non_streaming_mode=(mode == "full"),
    )  # fmt: skip
    inst: list[int] | None = None
    if instruct:
        inst = instruct_ids(cfg, tokenizer.encode("user\n" + instruct), tokenizer.encode("\n"))
        kw["instruct_ids"] = [torch.tensor([inst])]
    ref_x, ref_trailing = official_prompt(official, **kw)

    spec = None
    if speaker:
        spec = VoiceSpec(
            name=speaker,
            speaker_id=cfg.talker.spk_id[speaker],
            dialect=cfg.talker.spk_is_dialect.get(speaker),
        )
    pre = build_prefill(
        cfg, role=role_ids(cfg, tokenizer.encode("assistant\n")), instruct=inst, voice=spec,
        lang_id=resolve_language(cfg, language, spec), queue=list(TEXT), mode=mode,  # type: ignore[arg-type]
        text_complete=True,
    )  # fmt: skip
    with torch.no_grad():
        x = ours.embed_slots(pre.slots)
        # What our decode steps add: the rest of the queue, then eos, then pad.
        rest = TEXT[pre.consumed :] + ([] if pre.eos_fed else [cfg.tts_eos_id])
        trailing = ours.embed_text(torch.tensor([rest or [cfg.tts_pad_id]]))
    torch.testing.assert_close(x, ref_x, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(trailing, ref_trailing, rtol=1e-5, atol=1e-6)


def test_teacher_forced_logits_match_official(pair: tuple[Any, Talker, ModelConfig]) -> None:
    """Run the official model greedily, then feed its codes to both models step by step."""
    official, ours, cfg = pair
    n_steps = 24
    kw = dict(
        input_ids=[template(TEXT)], languages=["english"], speakers=["ryan"], non_streaming_mode=False,
        do_sample=False, subtalker_dosample=False, max_new_tokens=n_steps + 1,
    )  # fmt: skip
    prefill, trailing = official_prompt(official, **kw)
    torch.manual_seed(0)
    codes = official.generate(**kw)[0][0]  # [frames, 16]
    n = codes.shape[0]
    assert n >= 8
    t = official.talker
    with torch.no_grad():
        # Official: one parallel pass over prefill + every teacher-forced step input.
        frame_in = torch.stack([ours.embed_frames(codes[k]) for k in range(n)])  # [n, H]
        addends = trailing[0]
        pad = ours.embed_text(torch.tensor([[cfg.tts_pad_id]]))[0]
        steps = torch.stack(
            [frame_in[k] + (addends[k] if k < addends.shape[0] else pad[0]) for k in range(n - 1)]
        )
        full = torch.cat([prefill[0], steps])[None]
        ref_h = t.model(inputs_embeds=full, use_cache=False).last_hidden_state[0]
        ref_logits = t.codec_head(ref_h)[prefill.shape[1] - 1 :]  # one per frame

        # Ours: prefill, then one cached decode step per frame (a batch row at row 1 of 3).
        cache = TalkerCache(cfg.talker.transformer, 3, 64, torch.device("cpu"), torch.float32)
        p = prefill.shape[1]
        pos = torch.arange(p)[None]
        h = ours.forward_hidden(prefill, pos, cache.bind(slice(1, 2), pos))
        logits = [ours.codec_head(h[0, -1])]
        hidden = [h[0, -1]]
        for k in range(n - 1):
            pos = torch.tensor([[p + k]])
            h = ours.forward_hidden(steps[k][None, None], pos, cache.bind(slice(1, 2), pos))
            logits.append(ours.codec_head(h[0, -1]))
            hidden.append(h[0, -1])
        torch.testing.assert_close(torch.stack(logits), ref_logits[:n], rtol=1e-4, atol=1e-5)

        # Code predictor, teacher-forced on the official codes, at every frame.
        cp = t.code_predictor
        for k in range(n):
            inp = [ref_h[p - 1 + k], t.get_input_embeddings()(codes[k, 0])]
            inp += [cp.get_input_embeddings()[g](codes[k, g + 1]) for g in range(14)]
            out = cp.model(inputs_embeds=cp.small_to_mtp_projection(torch.stack(inp)[None]), use_cache=False)
            ref_cp = torch.stack([cp.lm_head[g](out.last_hidden_state[0, g + 1]) for g in range(15)])
            got: list[torch.Tensor] = []

            def forced(g: int, lg: torch.Tensor, k: int = k, got: list[torch.Tensor] = got) -> torch.Tensor:
                got.append(lg[0])
                return codes[k, g + 1][None]

            ours.code_predictor.predict(hidden[k][None], ours.embed_codec(codes[k, :1]), forced)
            torch.testing.assert_close(torch.stack(got), ref_cp, rtol=1e-4, atol=1e-5)


def test_processed_logits_match_transformers() -> None:
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        MinNewTokensLengthLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
        SuppressTokensLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    g = torch.Generator().manual_seed(0)
    vocab, eos = 3072, 2150
    suppress_ids = [i for i in range(vocab - 1024, vocab) if i != eos]
    from engine.torch.sampler import suppress_mask

    for trial in range(30):
        history = torch.randint(0, 2048, (int(torch.randint(0, 12, (1,), generator=g)),), generator=g)
        logits = torch.randn(1, vocab, generator=g) * 3
        temp, top_k, top_p, pen = [(0.9, 50, 1.0, 1.05), (0.7, 10, 0.8, 1.3), (1.3, 0, 0.5, 1.0)][trial % 3]
        procs = LogitsProcessorList(
            [
                RepetitionPenaltyLogitsProcessor(pen),
                MinNewTokensLengthLogitsProcessor(0, 2, eos),
                SuppressTokensLogitsProcessor(suppress_ids),
                TemperatureLogitsWarper(temp),
            ]
            + ([TopKLogitsWarper(top_k)] if top_k else [])
            + ([TopPLogitsWarper(top_p)] if top_p < 1 else [])
        )
        ref = procs(history[None], logits.clone())
        seen = torch.zeros(1, vocab, dtype=torch.bool)
        seen[0, history] = True
        block = torch.tensor([history.numel() < 2])
        ours = talker_processors(
            logits, seen, torch.tensor([pen]), block, suppress_mask(vocab, eos, "cpu"), eos
        )
        ours = warp(ours, torch.tensor([temp]), torch.tensor([top_k]), torch.tensor([top_p]))
        torch.testing.assert_close(ours, ref, rtol=0, atol=0)
