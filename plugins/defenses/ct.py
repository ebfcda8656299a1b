"""CT, Confusion Training (Qi et al., USENIX Security 2023), adapted to captioning on a proxy
captioner (methods/defenses.md §3).

Six rounds on CT's own detection model, a small captioner (the victim's frozen vision encoder,
pooled, projected into a 2-layer 256-wide transformer decoder trained from scratch, the victim's
tokenizer): pretrain on the distilled set D_r, confusion-train with a reserved clean set whose
captions are mismatched (a derangement re-drawn every iteration), distill the lowest-loss
ρ_r·|D| instances (the last round: the low-loss component of a 2-Gaussian mixture on log ℓ).
The final fitted group is removed when the 2-vs-1-Gaussian likelihood ratio of its pooled
features (PCA to 2-D) exceeds 1.5; the base victim is then retrained on the rest (methods/defenses.md §0). The
features are §3's first choice, the pooled perceiver output of the model under defense (the
backdoored one: its perceiver was fine-tuned on D, as the original's inspected network was), or
the frozen encoder's. The fitted group is reported as the defense's candidates whether or not
the gate lets it through, so the harness can show what the gate discarded.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vlmbackdoor_bench.errors import VbbError
from vlmbackdoor_bench.hookspecs import DefenseContext, DefenseOutcome, hookimpl
from vlmbackdoor_bench.types import DefenseReport, ImageBank

from ._baseline_common import histogram, retrain_base, subset

__version__ = "1.1.0"

DEFAULTS: dict[str, Any] = {
    "ratios": [1 / 2, 1 / 5, 1 / 25, 1 / 50, 1 / 100],  # methods/defenses.md §3: ρ of rounds 0-4
    "pretrain_epochs": [10, 10, 4, 4, 4, 4],  # §3 proxy schedule (an adaptation)
    "confusion_iterations": [6000, 6000, 6000, 6000, 2000, 2000],  # methods/defenses.md §3, × |D| / 50,000
    "iterations_reference_size": 50_000,  # §3: the iteration counts are for |D| = 50,000
    "confusion_lr": [0.001, 0.001, 0.001, 0.01, 0.01, 0.01],  # methods/defenses.md §3: per round (CIFAR-10)
    "lambdas": [20, 20, 20, 30, 30, 15],  # §3: L = ((λ − 1)·L_conf + L_insp)/λ
    "batch_factor": 2,  # methods/defenses.md §3: every k = 2nd confusion iteration also takes a D_r batch
    "confusion_momentum": 0.7,  # §3
    "pretrain_lr": 0.01, "pretrain_momentum": 0.9,  # methods/defenses.md §3 pretraining: SGD lr 0.01, momentum 0.9
    "weight_decay": 1e-4, "batch_size": 32,  # §3
    "lr_threshold": 1.5,  # methods/defenses.md §3: one global group -> flag iff LR > 1.5 (LR > 2 is the strict option)
    # §3 identification features: "perceiver" = the backdoored victim's pooled perceiver output,
    # "encoder" = the frozen vision encoder's pooled tokens (the proxy's own input)
    "features": "perceiver",
    "n_clean": 2000,  # methods/defenses.md §3: D_cl has 2,000 pairs disjoint from the fine-tuning set
    "width": 256, "layers": 2,  # §3 proxy: 2-layer, 256-wide transformer decoder
    # Multiplies every pretraining epoch count and confusion iteration count. 1.0 is the spec's
    # proxy schedule (≈ 27k batch steps at |D| = 25,000, ~50 ms each: over 20 min on 2 CPU
    # cores before the 6 loss passes over D). Measured on the tiny world's VL-Trojan set (the
    # fitted group's precision / recall, its perceiver LR, detection seconds): 0.02 -> 97.7 /
    # 72.8 %, LR 1.54, 121 s; 0.05 -> 98.8 / 94.7 %, LR 2.03, 160 s. At 0.03 a whole run on the
    # tiny world took 362 s (BadNet: detection 175 s + the retrain 186 s, which no budget shrinks).
    "budget_scale": 0.03,
}
FEATURES = ("perceiver", "encoder")
PRESETS = {
    "default": DEFAULTS,
    "spec-schedule": {**DEFAULTS, "budget_scale": 1.0},  # methods/defenses.md §3 proxy schedule unscaled (GPU)
    "strict": {**DEFAULTS, "lr_threshold": 2.0},  # §3: the stricter LR > 2 option
}
ROUNDS = 6  # methods/defenses.md §3: rounds r = 0..5


def random_derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A uniform random permutation without fixed points (rejection: ~e tries on average)."""
    if n < 2:
        raise VbbError(f"CT needs at least 2 clean pairs to mismatch captions, got {n}",
                       "reserve more clean pairs (n_clean in [defense.ct])")
    while True:
        perm = rng.permutation(n)
        if not np.any(perm == np.arange(n)):
            return perm


def likelihood_ratio(features: np.ndarray, fitted: np.ndarray) -> float:
    """LR = exp((loglik₂ − loglik₁)/n) of 2 Gaussians (the fitted group and the rest) against
    1 Gaussian, on the features reduced to 2-D by PCA (methods/defenses.md §3 identification)."""
    fitted = np.asarray(fitted, bool)
    if fitted.all() or not fitted.any():
        return 1.0
    centred = features - features.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    points = centred @ vt[:2].T
    one = _gaussian_loglik(points).sum()
    # each group under its own Gaussian (the assignment is given, not fitted by EM), so a random
    # split of one Gaussian gives LR ≈ 1 and only a separated group exceeds the 1.5 gate
    two = _gaussian_loglik(points[fitted]).sum() + _gaussian_loglik(points[~fitted]).sum()
    return float(math.exp(min((two - one) / len(points), 700.0)))  # a degenerate group: cap, not overflow


def _gaussian_loglik(points: np.ndarray) -> np.ndarray:
    mean = points.mean(0)
    cov = np.cov(points, rowvar=False) if len(points) > 2 else np.eye(points.shape[1])
    cov = np.atleast_2d(cov) + 1e-6 * np.eye(points.shape[1])
    diff = points - mean
    _, logdet = np.linalg.slogdet(cov)
    maha = np.einsum("ij,jk,ik->i", diff, np.linalg.inv(cov), diff)
    return -0.5 * (maha + logdet + points.shape[1] * math.log(2 * math.pi))


def low_loss_component(losses: np.ndarray, seed: int) -> np.ndarray:
    """Final-round "still correct": the low-loss component of a 2-Gaussian mixture on log ℓ (methods/defenses.md §3)."""
    from sklearn.mixture import GaussianMixture

    logs = np.log(np.maximum(losses, 1e-8)).reshape(-1, 1)
    mixture = GaussianMixture(2, random_state=seed).fit(logs)
    return mixture.predict(logs) == int(np.argmin(mixture.means_.ravel()))


def pretrain_steps(epochs: float, n_items: int, params: Mapping[str, Any]) -> int:
    """Optimiser steps of ``epochs`` × budget_scale epochs over ``n_items`` (batch 32, methods/defenses.md §3)."""
    return max(1, round(epochs * params["budget_scale"] * n_items / params["batch_size"]))


def confusion_iterations(round_index: int, n: int, params: Mapping[str, Any]) -> int:
    """methods/defenses.md §3: the round's iterations × |D| / 50,000, × budget_scale, at least one D_r batch."""
    scaled = params["confusion_iterations"][round_index] * n / params["iterations_reference_size"]
    return max(params["batch_factor"], round(scaled * params["budget_scale"]))


# ----------------------------------------------------------------------------- the proxy (methods/defenses.md §3)
class ProxyCaptioner(nn.Module):
    """Pooled frozen-encoder features -> a prefix token of a causal 2-layer transformer decoder."""

    def __init__(self, feature_dim: int, vocab: int, width: int, layers: int, max_len: int):
        super().__init__()
        self.project = nn.Linear(feature_dim, width)
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(0.02 * torch.randn(max_len, width))
        block = nn.TransformerEncoderLayer(width, 4, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.body = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, vocab)

    def forward(self, features: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-sample mean NLL of ``ids`` (B, T) given ``features`` (B, D); ``mask`` marks tokens."""
        # Padding sits after every caption token, so under the causal mask the columns past the
        # batch's longest caption change no real token's loss: drop them (captions average ~15
        # of the set's up to 28 tokens, and the proxy's cost is linear in the columns).
        length = int(mask.sum(1).max())
        ids, mask = ids[:, :length], mask[:, :length]
        x = torch.cat([self.project(features)[:, None], self.embed(ids[:, :-1])], dim=1)
        x = x + self.position[: x.shape[1]]
        causal = nn.Transformer.generate_square_subsequent_mask(x.shape[1], device=x.device)
        logits = self.head(self.body(x, mask=causal, is_causal=True))
        nll = F.cross_entropy(logits.transpose(1, 2), ids, reduction="none") * mask
        return nll.sum(1) / mask.sum(1).clamp(min=1)


def encode_captions(victim: Any, captions: list[str], max_len: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    """The victim's tokenizer (methods/defenses.md §3): caption tokens + EOS, right-padded; (ids, mask)."""
    tokenizer = getattr(victim, "tokenizer", None)
    if tokenizer is None:
        raise VbbError("CT's proxy captioner needs the victim's tokenizer (victim.tokenizer)",
                       "use a victim that exposes its tokenizer")
    rows = [tokenizer(c, add_special_tokens=False)["input_ids"][: max_len - 1] + [tokenizer.eos_token_id]
            for c in captions]
    ids = torch.zeros(len(rows), max_len, dtype=torch.long)
    mask = torch.zeros(len(rows), max_len, dtype=torch.bool)
    for k, row in enumerate(rows):
        ids[k, : len(row)], mask[k, : len(row)] = torch.tensor(row), True
    return ids, mask


def pooled_features(victim: Any, images: ImageBank, indices: list[int], chunk: int = 256) -> torch.Tensor:
    """The victim's frozen encoder tokens, mean-pooled, one row per instance (methods/defenses.md §3 proxy)."""
    return per_instance(lambda batch: torch.as_tensor(victim.vision_features(batch)).float().mean(1),
                        images, indices, chunk)


def media_features(victim: Any, images: ImageBank, indices: list[int], chunk: int = 256) -> torch.Tensor:
    """The victim's pooled perceiver output, one row per instance (methods/defenses.md §3 identification)."""
    return per_instance(lambda batch: torch.as_tensor(victim.media_features(batch)).float(), images, indices, chunk)


def per_instance(rows_of: Any, images: ImageBank, indices: list[int], chunk: int) -> torch.Tensor:
    """``rows_of`` on each distinct image once (in chunks), one row per instance index."""
    unique = sorted(set(indices))
    pooled = [rows_of(images.take(unique[s:s + chunk])) for s in range(0, len(unique), chunk)]
    row = {index: k for k, index in enumerate(unique)}
    return torch.cat(pooled)[[row[i] for i in indices]]


def clean_reserved_pairs(context: DefenseContext, n_clean: int) -> tuple[ImageBank, list[int], list[str], str]:
    """D_cl (methods/defenses.md §3): the first ``n_clean`` images of the harness's reserved clean split (disjoint from
    fine-tuning: Karpathy `restval`, the embedded world's `pretrain`), one caption each so that a
    mismatched caption is always another image's."""
    split = context.clean_reserved
    if split is None:
        raise VbbError("CT needs a reserved clean set disjoint from fine-tuning (methods/defenses.md §3) "
                       "and the DefenseContext has none",
                       "use a COCO dataset with a restval/pretrain split, or pass clean_reserved")
    rows = list(range(min(n_clean, len(split))))
    return ImageBank(split.images), rows, [split.references[r][0] for r in rows], \
        f"{split.dataset}:{split.split} ({len(rows)} pairs)"


class ProxyData:
    """D and D_cl as the proxy sees them (features, caption tokens) and its three procedures.

    The proxy trains where the victim's features are (``features.device``); a fresh proxy is
    initialised on the CPU and moved there, so a seed gives the same start on any device."""

    def __init__(self, features, tokens, clean_features, clean_tokens):
        length = max(int(tokens[1].sum(1).max()), int(clean_tokens[1].sum(1).max()))  # drop pad-only columns
        self.device = features.device
        self.features, (self.ids, self.mask) = features, (t[:, :length].to(self.device) for t in tokens)
        self.clean_features = clean_features.to(self.device)
        self.clean_ids, self.clean_mask = (t[:, :length].to(self.device) for t in clean_tokens)

    def new_model(self, params: Mapping[str, Any], vocab: int) -> ProxyCaptioner:
        model = ProxyCaptioner(self.features.shape[1], vocab, params["width"], params["layers"], self.ids.shape[1])
        return model.to(self.device)

    @staticmethod
    def _sgd(model, lr: float, momentum: float, params) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=params["weight_decay"])

    def pretrain(self, model, current, mismatch, epochs: float, params, rng) -> int:
        """SGD lr 0.01, momentum 0.9 on D_r (∪ D_cl with mismatched captions in the final round)."""
        feats, ids, mask = self.features[current], self.ids[current], self.mask[current]
        if mismatch is not None:
            feats = torch.cat([feats, self.clean_features])
            ids, mask = torch.cat([ids, self.clean_ids[mismatch]]), torch.cat([mask, self.clean_mask[mismatch]])
        optimizer = self._sgd(model, params["pretrain_lr"], params["pretrain_momentum"], params)
        model.train()
        steps = pretrain_steps(epochs, len(ids), params)
        order = np.concatenate([rng.permutation(len(ids)) for _ in range(math.ceil(steps * params["batch_size"] / len(ids)))])
        for step in range(steps):
            b = order[step * params["batch_size"]:(step + 1) * params["batch_size"]]
            loss = model(feats[b], ids[b], mask[b]).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return steps

    def confuse(self, model, current, iterations: int, lr: float, lam: float, params, rng) -> None:
        """Every iteration a D_cl batch with deranged captions (L_conf); every k-th also a D_r
        batch (L_insp): L = ((λ − 1)·L_conf + L_insp)/λ (methods/defenses.md §3)."""
        optimizer = self._sgd(model, lr, params["confusion_momentum"], params)
        size = min(params["batch_size"], len(self.clean_ids))
        order = iter(())
        model.train()
        for it in range(iterations):
            b = rng.choice(len(self.clean_ids), size, replace=False)
            wrong = b[random_derangement(size, rng)]  # re-drawn every iteration
            loss = model(self.clean_features[b], self.clean_ids[wrong], self.clean_mask[wrong]).mean()
            if (it + 1) % params["batch_factor"] == 0:
                batch = [next(order, None) for _ in range(min(params["batch_size"], len(current)))]
                if None in batch:
                    order = iter(rng.permutation(current).tolist())
                    batch = [next(order) for _ in range(min(params["batch_size"], len(current)))]
                inspect = model(self.features[batch], self.ids[batch], self.mask[batch]).mean()
                loss = ((lam - 1) * loss + inspect) / lam
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    @torch.no_grad()
    def losses(self, model, chunk: int = 1024) -> np.ndarray:
        """Per-instance loss on D, in chunks of similar caption length (each chunk drops its padding)."""
        model.eval()
        by_length = np.argsort(-self.mask.sum(1).cpu().numpy(), kind="stable")
        out = np.zeros(len(self.ids))
        for s in range(0, len(by_length), chunk):
            rows = by_length[s:s + chunk]
            out[rows] = model(self.features[rows], self.ids[rows], self.mask[rows]).cpu().numpy()
        return out


class ConfusionTraining:
    name = "ct"
    label, order = "CT", 30
    paper_tables = {2: 3}  # the SRD paper's Table 2: table -> column
    version = __version__
    presets = PRESETS
    default_preset = "default"

    def defend(self, context: DefenseContext, params: Mapping[str, Any]) -> DefenseOutcome:
        params = {**DEFAULTS, **params}
        for key, length in (("ratios", ROUNDS - 1), ("pretrain_epochs", ROUNDS), ("confusion_iterations", ROUNDS),
                            ("confusion_lr", ROUNDS), ("lambdas", ROUNDS)):
            if len(params[key]) != length:
                raise VbbError(f"CT {key} has {len(params[key])} entries", f"give {length} (methods/defenses.md §3)")
        if params["features"] not in FEATURES:
            raise VbbError(f"CT features = {params['features']!r} is unknown", f"use one of {FEATURES}")
        # checked before the rounds run, so a missing method costs no training
        if params["features"] == "perceiver" and not callable(getattr(context.backdoored, "media_features", None)):
            raise VbbError("CT's perceiver features need victim.media_features (hookspecs.Victim)",
                           'use a victim that has it, or features = "encoder" in [defense.ct]')
        started = time.perf_counter()
        data = context.training_set
        bank, rows, captions, clean_source = clean_reserved_pairs(context, params["n_clean"])
        base = context.base_victim  # its frozen encoder and tokenizer (the backdoored one's are the same)
        proxy_data = ProxyData(pooled_features(base, data.images, [e.image_index for e in data.examples]),
                               encode_captions(base, [e.caption for e in data.examples]),
                               pooled_features(base, bank, rows), encode_captions(base, captions))
        fitted, log = self.distill(proxy_data, params, context.seed, len(base.tokenizer))
        features = proxy_data.features if params["features"] == "encoder" else \
            media_features(context.backdoored, data.images, [e.image_index for e in data.examples])
        ratio = likelihood_ratio(features.cpu().numpy(), fitted)
        flagged = np.flatnonzero(fitted) if ratio > params["lr_threshold"] else np.zeros(0, int)
        detect_seconds = time.perf_counter() - started
        victim, retrain = retrain_base(context, subset(data, np.setdiff1d(np.arange(len(data)), flagged)),
                                       "ct retrain on kept")
        details = {**log, "clean_set": clean_source, "likelihood_ratio": ratio, "n_fitted": int(fitted.sum()),
                   "identification_features": params["features"],
                   "flagged": bool(len(flagged)), "retrain": retrain,
                   "seconds": {"detect": detect_seconds, "retrain": retrain["seconds"]}, "params": dict(params)}
        return DefenseOutcome(victim, DefenseReport(
            removed_sample_ids=[data.examples[int(i)].sample_id for i in flagged], details=details,
            candidate_sample_ids=[data.examples[int(i)].sample_id for i in np.flatnonzero(fitted)]))

    def distill(self, d: ProxyData, params: Mapping[str, Any], seed: int, vocab: int) -> tuple[np.ndarray, dict]:
        """The six rounds of methods/defenses.md §3; returns the final fitted mask over D and a log."""
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        n = len(d.ids)
        iterations = [confusion_iterations(r, n, params) for r in range(ROUNDS)]
        pretrained = d.new_model(params, vocab)  # round 0 starts from a fresh initialisation
        current = np.arange(n)  # D_0 = D
        log: dict[str, Any] = {"rounds": [], "confusion_iterations": iterations}
        for r in range(ROUNDS):
            final = r == ROUNDS - 1
            # the final round pretrains on D_r ∪ D_cl, D_cl's captions mismatched once (methods/defenses.md §3)
            extra = random_derangement(len(d.clean_ids), rng) if final else None
            steps = d.pretrain(pretrained, current, extra, params["pretrain_epochs"][r], params, rng)
            confused = copy.deepcopy(pretrained)  # later rounds continue from this checkpoint
            d.confuse(confused, current, iterations[r], params["confusion_lr"][r], params["lambdas"][r], params, rng)
            losses = d.losses(confused)
            if final:
                fitted = low_loss_component(losses, seed)
            else:
                current = np.argsort(losses, kind="stable")[: max(1, math.ceil(params["ratios"][r] * n))]
            log["rounds"].append({"round": r, "pretrain_steps": steps, "n_distilled": int(fitted.sum() if final else len(current)),
                                  "loss_histogram": histogram(np.log(np.maximum(losses, 1e-8)))})
        return fitted, log


@hookimpl
def register_defenses(register) -> None:
    register(ConfusionTraining())
