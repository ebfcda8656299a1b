"""BLEU-1..4, CIDEr(-D) and ROUGE-L with pycocoevalcap, COCOEvalCap semantics (methods/metrics.md §3).

Candidates and references go through Stanford's PTBTokenizer (the CoreNLP 3.4.1 jar shipped in
the pycocoevalcap wheel, ``-preserveLines -lowerCase``), then the punctuation tokens of
pycocoevalcap's ``PUNCTUATIONS`` list are dropped, exactly as ``PTBTokenizer.tokenize`` does.
Two differences from calling ``COCOEvalCap`` directly, neither of which changes a score:

* candidates and references are tokenised in **one** JVM call (COCOEvalCap makes two), and every
  distinct sentence only once per process (a bounded memo; PTB tokenisation with
  ``-preserveLines`` is line-local, so a sentence's tokens do not depend on its neighbours);
* the temporary file goes to the system temp directory, not into site-packages, and nothing is
  printed (BLEU runs with ``verbose=0``).

CIDEr's idf is computed from the reference sets of the evaluated images only (methods/metrics.md §3), so the score
depends on which images are evaluated: only the ids of ``captions`` are scored.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from ..errors import VbbError

__all__ = ["caption_scores", "ptb_tokenize", "java_available"]

# methods/metrics.md §3: PTBTokenizer of the CoreNLP 3.4.1 jar shipped in the pycocoevalcap 1.2 wheel.
PTB_JAR_NAME = "stanford-corenlp-3.4.1.jar"
PTB_MAIN_CLASS = "edu.stanford.nlp.process.PTBTokenizer"
# methods/metrics.md §3: "run with lowercasing"; one output line per input line (pycocoevalcap's flags).
PTB_FLAGS = ("-preserveLines", "-lowerCase")
# methods/metrics.md §3: "after which punctuation tokens are removed" (pycocoevalcap's PUNCTUATIONS list).
PTB_PUNCTUATIONS = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--",
     "...", ";"]
)
# methods/metrics.md §3: BLEU up to 4-grams ("Bleu(4)"), CIDEr-D n = 1-4 with sigma = 6.
BLEU_N = 4
CIDER_N = 4
CIDER_SIGMA = 6.0
# methods/metrics.md §3: every reported value is the library's fraction x 100, at full precision.
PERCENT = 100.0

# Characters CoreNLP's lexer treats as line breaks; pycocoevalcap only replaces "\n". Replacing all
# of them by a space keeps one line per sentence (otherwise tokens would shift to other images).
_LINE_BREAKS = ("\r\n", "\n", "\r", "\u2028", "\u2029", "\u000b", "\u000c", "\u0085")
# A last line whose tokenisation is known; checking it proves the output is aligned.
_SENTINEL = "vbbsentinelzq"
_MEMO_MAX = 300_000  # distinct sentences kept (refs of COCO + Flickr30k test are ~30k)
_memo: "OrderedDict[str, str]" = OrderedDict()
_memo_lock = threading.Lock()


def _jar_path() -> Path:
    try:
        from pycocoevalcap.tokenizer import ptbtokenizer
    except ImportError as exc:  # pragma: no cover - declared dependency
        raise VbbError(
            "pycocoevalcap is not installed, so BLEU/CIDEr cannot be computed",
            "pip install pycocoevalcap==1.2",
        ) from exc
    jar = Path(ptbtokenizer.__file__).resolve().parent / PTB_JAR_NAME
    if not jar.is_file():
        raise VbbError(
            f"the PTB tokenizer jar is missing from the pycocoevalcap install: {jar}",
            "reinstall pycocoevalcap==1.2 (pip install --force-reinstall pycocoevalcap==1.2)",
        )
    return jar


def java_available() -> bool:
    """True when a ``java`` executable is on PATH (needed by the PTB tokenizer, methods/metrics.md §3)."""
    return shutil.which("java") is not None


def _clean_line(sentence: str) -> str:
    for br in _LINE_BREAKS:
        sentence = sentence.replace(br, " ")
    return sentence


def _run_ptb(sentences: Sequence[str]) -> list[str]:
    """Tokenise ``sentences`` in one JVM call; returns the punctuation-free token strings."""
    java = shutil.which("java")
    if java is None:
        raise VbbError(
            "Java is not on PATH, and BLEU/CIDEr need the Stanford PTB tokenizer (a Java jar); "
            "the benchmark does not fall back to another tokenizer (methods/metrics.md §3)",
            "install a Java runtime (e.g. apt-get install openjdk-17-jre-headless) and put `java` "
            "on PATH",
        )
    jar = _jar_path()
    lines = [_clean_line(s) for s in sentences] + [_SENTINEL]
    fd, tmp = tempfile.mkstemp(prefix="vbb-ptb-", suffix=".txt")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write("\n".join(lines).encode("utf-8"))
        proc = subprocess.run(
            [java, "-cp", str(jar), PTB_MAIN_CLASS, *PTB_FLAGS, "-encoding", "utf-8", tmp],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
    finally:
        try:
            os.remove(tmp)
        except OSError:
            pass
    if proc.returncode != 0:
        raise VbbError(
            f"the PTB tokenizer (java) failed with exit status {proc.returncode}: "
            f"{proc.stderr.decode('utf-8', 'replace').strip()[-500:]}",
            "check that `java -version` works (Java 17 is the tested runtime)",
        )
    out = proc.stdout.decode("utf-8").split("\n")
    if len(out) <= len(sentences) or out[len(sentences)].strip() != _SENTINEL:
        raise VbbError(
            "the PTB tokenizer returned output that is not aligned with its input lines "
            f"({len(out)} lines for {len(sentences)} sentences)",
            "report this with the caption file; a caption may contain an unusual control character",
        )
    return [
        " ".join(w for w in line.rstrip().split(" ") if w not in PTB_PUNCTUATIONS)
        for line in out[: len(sentences)]
    ]


def ptb_tokenize(sentences: Iterable[str]) -> list[str]:
    """PTB-tokenise (lower-cased, punctuation removed) each sentence, as pycocoevalcap does.

    All sentences not yet seen in this process are tokenised in a single JVM call.
    """
    sentences = list(sentences)
    with _memo_lock:
        todo = list(dict.fromkeys(s for s in sentences if s not in _memo))
    if todo:
        tokens = _run_ptb(todo)
        with _memo_lock:
            for s, t in zip(todo, tokens):
                _memo[s] = t
    result: list[str] = []
    with _memo_lock:
        for s in sentences:
            tok = _memo.get(s)
            if tok is None:  # evicted by a concurrent caller between the two locked sections
                tok = _run_ptb([s])[0]
            else:
                _memo.move_to_end(s)
            result.append(tok)
        while len(_memo) > _MEMO_MAX:
            _memo.popitem(last=False)
    return result


def _check_ids(captions: Mapping[int, str], references: Mapping[int, Sequence[str]]) -> None:
    unknown = [i for i in captions if i not in references]
    if unknown:
        examples = ", ".join(str(i) for i in sorted(unknown, key=str)[:5])
        raise VbbError(
            f"{len(unknown)} of {len(captions)} captioned image ids have no references "
            f"(e.g. {examples})",
            "score the captions against the reference file of the same dataset and split "
            "(e.g. the Karpathy test references for COCO test captions)",
        )
    empty = [i for i in captions if len(references[i]) == 0]
    if empty:
        examples = ", ".join(str(i) for i in sorted(empty, key=str)[:5])
        raise VbbError(
            f"{len(empty)} evaluated images have an empty reference list (e.g. {examples})",
            "every evaluated image needs at least one reference caption; fix the reference file",
        )


def caption_scores(
    captions: Mapping[int, str], references: Mapping[int, Sequence[str]]
) -> dict:
    """BLEU-1..4, CIDEr(-D) and ROUGE-L (x100, full precision) of ``captions`` (methods/metrics.md §3).

    ``captions`` maps image id -> one (post-processed) caption; empty captions are kept.
    ``references`` maps image id -> reference captions; it may hold more ids than ``captions``
    (they are ignored: only the captioned images are evaluated, and CIDEr's idf comes from their
    references). A captioned id missing from ``references`` is a :class:`VbbError`.

    Returns ``{"bleu1", "bleu2", "bleu3", "bleu4", "cider", "rouge_l", "spice", "n_images"}``;
    ``spice`` is always ``None`` (not computable offline, methods/metrics.md §3).
    """
    if not captions:
        raise VbbError("there are no captions to score", "pass at least one image's caption")
    for i, c in captions.items():
        if not isinstance(c, str):
            raise VbbError(
                f"the caption of image {i} is a {type(c).__name__}, not a string",
                "captions must map image id -> caption string",
            )
    _check_ids(captions, references)

    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    ids = list(captions)
    cand = [captions[i] for i in ids]
    refs = [list(references[i]) for i in ids]
    flat_refs = [r for rs in refs for r in rs]
    tokens = ptb_tokenize(cand + flat_refs)
    res = {i: [t] for i, t in zip(ids, tokens[: len(ids)])}
    gts: dict = {}
    pos = len(ids)
    for i, rs in zip(ids, refs):
        gts[i] = tokens[pos : pos + len(rs)]
        pos += len(rs)

    bleu, _ = Bleu(BLEU_N).compute_score(gts, res, verbose=0)
    cider, _ = Cider(n=CIDER_N, sigma=CIDER_SIGMA).compute_score(gts, res)
    rouge, _ = Rouge().compute_score(gts, res)
    out = {f"bleu{k + 1}": float(bleu[k]) * PERCENT for k in range(BLEU_N)}
    out.update(
        cider=float(cider) * PERCENT,
        rouge_l=float(rouge) * PERCENT,
        spice=None,  # methods/metrics.md §3: SPICE is not computed, recorded as null
        n_images=len(ids),
    )
    return out
