"""Shared fixtures: tiny random verifiers and tokenizers built in the test, never downloaded."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen3Config,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)  # tiny CPU models gain nothing from more threads, and spin badly under load

import speculators_hf as sh  # noqa: E402  (after HF_HUB_OFFLINE: nothing may reach the Hub)
from speculators_hf.generation.kvcache import DraftTreeState, gather_rows, last_valid  # noqa: E402
from speculators_hf.generation.sampling import expand_draft_vocab  # noqa: E402


class OneTokenDraft(sh.SpeculatorModel):
    """The smallest draft the contract allows (not registered): one linear head on the verifier's last hidden
    state at t and the embedding of token t+1 predicts token t+2. A test module gives it a config class with a
    `hidden_size` field (and whatever else it declares) and registers it as its own family."""

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.head = nn.Linear(2 * config.hidden_size, config.vocab_size)
        self.post_init()

    def forward(self, input_ids, features):
        return self.head(torch.cat([self.embed(input_ids), features], dim=-1))

    def verifier_layer_ids(self):
        return self.last_hidden_layer_ids()

    def new_tree_state(self, batch_size, device=None):
        return DraftTreeState()  # no cache

    def max_tree_depth(self):
        return 1  # one token ahead

    def tree_extend(self, state, tokens, positions, valid, features):
        last = last_valid(valid)
        logits = self(gather_rows(tokens, last)[:, None], gather_rows(features[0], last)[:, None])[:, -1]
        return expand_draft_vocab(logits, None, self.config.vocab_size), logits.new_zeros(logits.shape[0], 0)


VOCAB = 96
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
VERIFIER_CONFIGS = {
    "llama": lambda **kw: LlamaConfig(**{**COMMON, **kw}),
    "qwen2": lambda **kw: Qwen2Config(**{**COMMON, **kw}),
    "qwen3": lambda **kw: Qwen3Config(**{**COMMON, "head_dim": 8, **kw}),
    "mistral": lambda **kw: MistralConfig(**{**COMMON, "sliding_window": None, **kw}),
}


def make_verifier(family: str = "llama", seed: int = 0, **overrides) -> PreTrainedModel:
    """A tiny random decoder-only verifier (fp32, eval mode). Larger init std makes its next-token
    distributions peaked, like a trained LM's, so greedy ties are practically impossible."""
    torch.manual_seed(seed)
    config = VERIFIER_CONFIGS[family](**overrides)
    config.initializer_range = 0.2
    model = AutoModelForCausalLM.from_config(config)
    return model.eval()


def make_prompts(n: int, seed: int = 0, min_len: int = 1, max_len: int = 24, vocab: int = VOCAB) -> list[torch.Tensor]:
    """`n` prompts of mixed length (ids 3.. so that no prompt holds bos/eos/pad)."""
    rng = random.Random(seed)
    return [torch.tensor([[rng.randrange(3, vocab) for _ in range(rng.randint(min_len, max_len))]]) for _ in range(n)]


@pytest.fixture(autouse=True)
def _calibration_dir(tmp_path_factory, monkeypatch):
    """Adaptive drafting saves its calibration on disk: in a folder of each test's own, never in the user's home
    (and learning, whatever the environment says)."""
    monkeypatch.setenv("SPECULATORS_HF_CALIBRATION_DIR", str(tmp_path_factory.mktemp("calibration")))
    monkeypatch.delenv("SPECULATORS_HF_AUTO_FROZEN", raising=False)


@pytest.fixture
def verifier() -> PreTrainedModel:
    return make_verifier("llama")


# the words of `tiny_tokenizer`'s vocabulary (tests build text from them)
TOKENIZER_WORDS = [
    "the",
    "a",
    "draft",
    "model",
    "verifier",
    "token",
    "fast",
    "speculative",
    "decoding",
    "is",
    "exact",
    "and",
    "same",
    "output",
    "text",
    "runs",
    "on",
    "cpu",
    "gpu",
]


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A real fast tokenizer (word-level, trained here on a few sentences) of vocabulary <= VOCAB."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    words = TOKENIZER_WORDS
    corpus = [" ".join(random.Random(i).choices(words, k=12)) for i in range(200)]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=["<pad>", "<s>", "</s>", "<unk>"]))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    assert len(fast) <= VOCAB
    return fast


CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="session")
def chat_tokenizer():
    """A real fast tokenizer WITH a ChatML-style chat template (<|im_start|>role ... <|im_end|>, eos
    <|im_end|>, like most chat models), so tests go through the installed transformers'
    `apply_chat_template`; word-level, vocabulary <= VOCAB."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    words = "the a draft model verifier token fast speculative decoding is exact and same output text runs on cpu gpu"
    words = [*words.split(), "user", "assistant", "system", "why", "how", "what"]
    corpus = [" ".join(random.Random(i).choices(words, k=12)) for i in range(200)]
    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=specials))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    assert len(fast) <= VOCAB and fast.convert_tokens_to_ids("<|im_start|>") != fast.unk_token_id
    return fast


def run_without_package(code: str, cwd: Path) -> str:
    """Run `code` in a fresh Python where `import speculators_hf` fails; return stdout."""
    prelude = textwrap.dedent(
        """
        import importlib.abc, sys
        class _Hide(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "speculators_hf" or name.startswith("speculators_hf."):
                    raise ModuleNotFoundError(f"No module named {name!r}")
        sys.meta_path.insert(0, _Hide())
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(cwd / "hf_modules")}
    proc = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


# ------------------------------------------------------------------------------------------------
# exactness checks shared by every draft family
# ------------------------------------------------------------------------------------------------
def assert_greedy_exact(verifier, draft, prompts, max_new_tokens: int = 24, **generate_kwargs):
    """Greedy output with the draft equals the verifier alone, token for token, on every prompt.
    Returns the summed generation stats."""
    from speculators_hf import GenerationStats

    total = GenerationStats()
    for i, prompt in enumerate(prompts):
        ref = verifier.generate(prompt, max_new_tokens=max_new_tokens, do_sample=False, **generate_kwargs)
        out = verifier.generate(
            prompt, max_new_tokens=max_new_tokens, do_sample=False, assistant_model=draft, **generate_kwargs
        )
        assert torch.equal(ref, out), (
            f"prompt {i}: draft changed the output\n verifier: {ref.tolist()}\n with draft: {out.tolist()}"
        )
        assert draft.generation_stats.emitted_tokens == out.shape[1] - prompt.shape[1]
        total = total + draft.generation_stats
    return total


def reference_warpers(temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float | None = None):
    """transformers' own warpers for these settings, in the order its generate() applies them: the definition
    of the distribution a sampled token must follow (built here, not by the code under test)."""
    from transformers import MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    warpers = []
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    if min_p is not None:
        warpers.append(MinPLogitsWarper(min_p))
    return warpers


def reference_probs(logits: torch.Tensor, temperature: float = 1.0, **warp) -> torch.Tensor:
    """The verifier's sampling distribution [N, V] from its logits [N, V] under these settings."""
    scores = logits.float()
    for warper in reference_warpers(temperature, **warp):
        scores = warper(None, scores)
    return torch.softmax(scores, dim=-1)


def sampling_pit_values(
    verifier, sequences: list[torch.Tensor], prompt_len: int, temperature: float = 1.0, seed: int = 0, **warp
):
    """Randomised probability-integral-transform values of every sampled token under the verifier's
    exact conditional distribution (tokens ordered by probability), with the sampling settings `temperature`
    and `warp` (top_k, top_p, min_p). If the tokens were drawn from the verifier's distribution, these are
    i.i.d. Uniform(0, 1) (chain rule), whatever the draft did."""
    gen = torch.Generator().manual_seed(seed)
    values = []
    with torch.no_grad():
        for seq in sequences:
            probs = reference_probs(verifier(seq).logits[0, prompt_len - 1 : -1], temperature, **warp)
            for t, token in enumerate(seq[0, prompt_len:].tolist()):
                p = probs[t]
                order = torch.argsort(p, descending=True, stable=True)
                rank = (order == token).nonzero().item()
                below = p[order[:rank]].sum().item()
                values.append(below + torch.rand((), generator=gen).item() * p[token].item())
    return values


def ks_uniform_statistic(values: list[float]) -> float:
    """Kolmogorov-Smirnov distance between the empirical distribution of `values` and Uniform(0, 1)."""
    xs = sorted(values)
    n = len(xs)
    return max(max((i + 1) / n - x, x - i / n) for i, x in enumerate(xs))


def chi_square(counts: torch.Tensor, probs: torch.Tensor, alpha: float = 1e-3) -> tuple[float, float]:
    """Pearson's chi-square of observed `counts` against expected probabilities `probs` (cells expecting fewer
    than 5 draws merged into one), and its critical value at false-alarm rate `alpha` (Wilson-Hilferty)."""
    import math
    from statistics import NormalDist

    n = counts.sum().item()
    expected = probs.double() * n
    small = expected < 5
    obs = torch.cat([counts[~small].double(), counts[small].double().sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    stat = (((obs - exp) ** 2)[keep] / exp[keep]).sum().item() + (obs[~keep].sum().item() * 1e9)
    df = int(keep.sum().item()) - 1
    z = NormalDist().inv_cdf(1 - alpha)
    crit = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    return stat, crit


def ks_critical_value(n: int, alpha: float) -> float:
    """Asymptotic KS critical value: P(D > c) ~= alpha under the null."""
    import math

    return math.sqrt(-math.log(alpha / 2) / (2 * n))


def assert_sampling_exact(
    verifier,
    draft,
    prompt,
    n_samples: int = 150,
    max_new_tokens: int = 8,
    temperature: float = 1.0,
    alpha: float = 1e-3,
):
    """Sampled outputs with the draft follow the verifier's distribution: KS test of PIT values against
    Uniform(0, 1) at false-alarm rate `alpha`. Returns (statistic, critical value, summed stats)."""
    from speculators_hf import GenerationStats

    total, sequences = GenerationStats(), []
    for i in range(n_samples):
        torch.manual_seed(1000 + i)
        out = verifier.generate(
            prompt,
            max_new_tokens=max_new_tokens,
            do_sample=True,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            assistant_model=draft,
        )
        sequences.append(out)
        total = total + draft.generation_stats
    values = sampling_pit_values(verifier, sequences, prompt.shape[1], temperature)
    stat, crit = ks_uniform_statistic(values), ks_critical_value(len(values), alpha)
    assert stat < crit, (
        f"sampled tokens do not follow the verifier's distribution: KS {stat:.4f} >= {crit:.4f} (n={len(values)})"
    )
    return stat, crit, total


def verifier_features(verifier, input_ids: torch.Tensor, layer_ids: list[int]) -> list[torch.Tensor]:
    """The verifier hidden states a draft reads, computed with a plain forward (no hooks), so tests can
    compare the draft's hook-fed behaviour against it."""
    from speculators_hf.generation.capture import verifier_hidden_states

    with torch.no_grad():
        return verifier_hidden_states(verifier, input_ids, layer_ids)


def propose_with(draft, input_ids: torch.Tensor, states: list[torch.Tensor], num_tokens: int, sampler=None):
    """What `draft` proposes after `input_ids` [1, n] from a new state, given the verifier hidden states `states`
    at positions 0..n-2 (one [1, n-1, H] tensor per layer id): the prefix is fed, then a chain of `num_tokens`
    is drawn (greedy unless `sampler` says otherwise). Returns (tokens [1, k], k scores [1, V])."""
    from speculators_hf.generation import Sampler
    from speculators_hf.generation.session import feed_and_draft

    features = [torch.nn.functional.pad(f, (0, 0, 1, 0)) for f in states]  # the state BEFORE each token
    sampler = sampler or Sampler(do_sample=False)
    sampler.begin_round([0], [input_ids[0]])
    with torch.no_grad():
        chain, _ = feed_and_draft(
            draft, draft.new_tree_state(1, input_ids.device), input_ids, 0, features, num_tokens, sampler
        )
    return chain.tokens, list(chain.scores.unbind(dim=1))


def draft_from_scratch(draft, verifier, input_ids: torch.Tensor, num_tokens: int, sampler=None):
    """`propose_with` fed the verifier's hidden states from a plain forward (no hooks)."""
    states = verifier_features(verifier, input_ids[:, :-1], draft.verifier_layer_ids())
    return propose_with(draft, input_ids, states, num_tokens, sampler)


def fresh_proposals(draft, verifier, input_ids: torch.Tensor, num_tokens: int):
    """Greedy proposals from scratch (see `draft_from_scratch`)."""
    return draft_from_scratch(draft, verifier, input_ids, num_tokens)


class Replay:
    """A sampler that picks recorded tokens (a [k] or [1, k] tensor) as the draft's choices and keeps the
    scores the draft computes now, so a proposal can be recomputed along a known path."""

    def __new__(cls, tokens: torch.Tensor):
        from speculators_hf.generation import Sampler

        class _Replay(Sampler):
            def __init__(self, recorded):
                super().__init__(do_sample=False)
                self.recorded = list(recorded.reshape(-1))

            def pick(self, logits, path=None):
                return self.recorded.pop(0)[None].to(logits.device), self.scores(logits, path)

        return _Replay(tokens)


def assert_rounds_match_recomputation(
    verifier, draft, n_prompts: int = 4, max_new_tokens: int = 24, min_accepted: int = 10, min_rounds: int = 10
) -> None:
    """Every round's proposals in transformers' loop (kept state, only the newly verified tokens and features
    fed) equal drafting from scratch on the full prefix. The verifier is flattened and sampled from, so many
    draft tokens are accepted and rounds with 0..k accepted tokens all occur."""
    from speculators_hf.generation.session import DraftSession

    with torch.no_grad():
        for p in verifier.parameters():
            p.mul_(0.6)
    rounds, original = [], DraftSession.step

    def recording(session, input_ids, num_tokens, sampler):
        tokens, scores = original(session, input_ids, num_tokens, sampler)
        if session.fed:  # not the placeholder before the verifier's prefill
            rounds.append((input_ids.clone(), tokens.clone(), [s.clone() for s in scores]))
        return tokens, scores

    DraftSession.step = recording
    accepted = 0
    try:
        for seed, prompt in enumerate(make_prompts(n_prompts, seed=11)):
            torch.manual_seed(seed)
            verifier.generate(
                prompt, max_new_tokens=max_new_tokens, do_sample=True, top_k=0, top_p=1.0, assistant_model=draft
            )
            accepted += draft.generation_stats.accepted_tokens
    finally:
        DraftSession.step = original
    assert accepted >= min_accepted and len(rounds) >= min_rounds, (accepted, len(rounds))
    for input_ids, tokens, scores in rounds:
        ref_tokens, ref_scores = draft_from_scratch(draft, verifier, input_ids, tokens.shape[1], Replay(tokens))
        assert torch.equal(tokens, ref_tokens)
        for a, b in zip(scores, ref_scores):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def rewrite_weights(folder: Path, edit) -> None:
    """Edit a saved checkpoint's model.safetensors in place (`edit` mutates the dict of tensors)."""
    from safetensors.torch import load_file, save_file

    weights = load_file(folder / "model.safetensors")
    edit(weights)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


def publish_to_hub_cache(folder: Path, repo_id: str, cache_dir: Path) -> None:
    """A folder as a downloaded Hub repo in `cache_dir` (for HF_HUB_OFFLINE=1 loading by repo id)."""
    from speculators_hf.loading import save_to_hub_cache

    save_to_hub_cache(folder, repo_id, cache_dir)


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA; they are skipped (and say why) on machines without it."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run on a GPU machine: pytest -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
