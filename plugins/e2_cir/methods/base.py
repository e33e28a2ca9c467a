"""The shape every composed-retrieval method has: ``fit`` (train its small network, if it has one,
on the training split, encoder frozen), ``queries`` (reference image + relative captions -> query
embeddings), and its network saved with the encoder it belongs to."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from e2_core import trim_padding
from e2_core.checkpoint import save_tensors


@dataclass
class TrainData:
    """What the methods train on: image embeddings (encoder frozen) and captions, with where they came from."""

    image_features: torch.Tensor  # (N, D) the encoder's raw image embeddings, as the originals feed their networks
    captions: List[str]
    source: Dict[str, object] = field(default_factory=dict)  # what the images and captions are, and their digest


@dataclass
class QueryBatch:
    """Queries of one category: the reference images, their embeddings and the prompts built from
    the relative captions by the convention (``"$"`` marks where the reference image goes)."""

    reference_names: List[str]
    reference_features: torch.Tensor  # (B, D) the encoder's raw image embeddings
    prompts: List[List[str]]  # per query, one or more texts (their embeddings are averaged)
    captions: List[Sequence[str]]  # the raw relative captions
    category: str
    load_image: Callable = None


class CIRMethod:
    """A zero-shot composed image retrieval method. Subclasses set ``name``, ``convention`` and what they
    are (``trains``, ``needs``, ``pseudo_word``) and implement :meth:`queries`; those with a network build
    it in :meth:`build` and train it in :meth:`fit`. Constructor keywords are the method's options; the
    ``cir`` task passes those of its own options a constructor names (e.g. CIReVL's ``captioner``).
    A new method is one module and one line in the ``e2_plugins.cir_methods`` entry-point group."""

    name = ""
    convention = "searle"  # the prompt convention of the method's paper (e2_eval.fashioniq.CONVENTIONS)
    placeholder = "$"  # the word the pseudo token replaces
    trains = False  # has a network trained on the training split (saved per encoder, reused)
    needs: Tuple[str, ...] = ()  # what it reads of the training split: "images", "captions"
    pseudo_word = False  # puts the reference image into the prompt as a pseudo word (needs a "$")

    def __init__(self, **options):
        self.options = options
        self.network: Optional[nn.Module] = None
        self.notes: Dict[str, object] = {}  # what training left out or derived, reported with the results

    def build(self, encoder) -> Optional[nn.Module]:
        """A fresh network for ``encoder`` (None: the method trains nothing)."""
        return None

    def fit(self, encoder, train: TrainData, progress: bool = True) -> None:
        """Train the network on ``train``; the encoder stays frozen."""

    def prepare(self, encoder, train: TrainData) -> None:
        """Anything besides the network that the method derives from the training split."""

    def queries(self, encoder, batch: QueryBatch) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    @classmethod
    def convert_original(cls, checkpoint: dict) -> Tuple[Dict[str, torch.Tensor], Dict[str, object]]:
        """The authors' released network (``checkpoint``, as ``torch.load`` reads their file) as this method's
        state dict, and the options that make :meth:`build` give a network of its shape."""
        raise NotImplementedError(f"{cls.name} has no released network to import")

    # --- helpers shared by the pseudo-token methods -----------------------------------------------
    def encode_prompts(self, encoder, prompts: List[List[str]], pseudo_tokens: Optional[torch.Tensor]) -> torch.Tensor:
        """Each query's prompts encoded (the pseudo token in place of ``$``), normalised, averaged, normalised."""
        features = []
        for k in range(max(len(p) for p in prompts)):
            texts = [p[k % len(p)] for p in prompts]
            features.append(F.normalize(self.encode_texts(encoder, texts, pseudo_tokens), dim=-1))
        return F.normalize(torch.stack(features).mean(dim=0), dim=-1)

    def encode_texts(self, encoder, texts: List[str], pseudo_tokens: Optional[torch.Tensor]) -> torch.Tensor:
        """Texts encoded, padding trimmed; with ``pseudo_tokens``, each text's ``$`` is its pseudo word."""
        device = encoder.device
        if pseudo_tokens is None:
            texts = [" ".join(t.replace("$", " ").split()) for t in texts]
            return encoder.encode_text(trim_padding(encoder.tokenizer(texts)).to(device))
        tokens = trim_padding(encoder.tokenizer([t.replace("$", self.placeholder) for t in texts])).to(device)
        return encoder.encode_text_with_pseudo_tokens(tokens, pseudo_tokens.to(device),
                                                      encoder.token_id(self.placeholder))


class PseudoWordMethod(CIRMethod):
    """A method whose network turns the reference image's embedding into a pseudo word (``$`` in the prompt)."""

    trains = True
    pseudo_word = True

    def train_network(self, encoder, count: int, loss_of, desc: str, progress: bool, weight_decay: float = 0.01,
                      min_batch: int = 2) -> None:
        """AdamW over ``options["epochs"]`` shuffled passes of ``count`` items; ``loss_of(rows)`` scores a batch."""
        o = self.options
        self.network = self.build(encoder).to(encoder.device).train()
        optimizer = torch.optim.AdamW(self.network.parameters(), lr=o["lr"], weight_decay=weight_decay)
        generator = torch.Generator().manual_seed(o["seed"])
        for _ in tqdm(range(o["epochs"]), desc=desc, disable=not progress, dynamic_ncols=True):
            for rows in torch.randperm(count, generator=generator).split(o["batch_size"]):
                if len(rows) < min_batch:
                    continue
                loss = loss_of(rows)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        self.network.eval()

    @torch.no_grad()
    def queries(self, encoder, batch: QueryBatch) -> torch.Tensor:
        pseudo = self.network(batch.reference_features.to(encoder.device))
        return self.encode_prompts(encoder, batch.prompts, pseudo)


class Phi(nn.Module):
    """The textual-inversion network: an image (or text) embedding -> one pseudo-word token embedding."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, dropout: float = 0.1,
                 activation: str = "gelu"):
        super().__init__()
        act = {"gelu": nn.GELU, "relu": nn.ReLU}[activation]
        self.layers = nn.Sequential(nn.Linear(input_dim, hidden_dim), act(), nn.Dropout(dropout),
                                    nn.Linear(hidden_dim, hidden_dim), act(), nn.Dropout(dropout),
                                    nn.Linear(hidden_dim, output_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE between the rows of ``a`` and ``b`` (normalised here), pairs on the diagonal."""
    logits = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).t() / temperature
    target = torch.arange(len(a), device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def frozen(encoder):
    """The encoder in eval mode with no parameter requiring a gradient (gradients still flow to inputs)."""
    encoder.eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    return encoder


# --- networks on disk ------------------------------------------------------------------------------

class NetworkMismatch(ValueError):
    """A saved network that belongs to another method or another encoder."""


def save_network(method: CIRMethod, encoder, path: Path, trained_on: Optional[Dict] = None) -> Path:
    """The method's network as safetensors, with the method, its options, the encoder it belongs to and
    what it was trained on."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in method.network.state_dict().items()}
    meta = {"method": method.name, "options": json.dumps(method.options), "encoder": encoder.name,
            "encoder_fingerprint": encoder.fingerprint(), "trained_on": json.dumps(trained_on or {})}
    return save_tensors(tensors, path, meta)


def load_network(method: CIRMethod, encoder, path: Path) -> Dict:
    """Load a saved network into ``method`` (its options too); one made for another method or encoder is refused,
    naming both. Returns what it was trained on."""
    with safe_open(str(path), "pt") as f:
        meta: Dict[str, str] = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("method") != method.name:
        raise NetworkMismatch(f"{path} holds a {meta.get('method', 'unknown')} network, not a {method.name} one")
    if meta.get("encoder_fingerprint") != encoder.fingerprint():
        raise NetworkMismatch(
            f"{path} was trained for the encoder {meta.get('encoder', '?')} "
            f"(weights {meta.get('encoder_fingerprint', '?')[:12]}), not for {encoder.name} "
            f"(weights {encoder.fingerprint()[:12]}): a {method.name} network belongs to one embedding space. "
            "Train one for this encoder (remove the file, or use another folder, networks=...)")
    method.options.update(json.loads(meta.get("options", "{}")))
    method.network = method.build(encoder)
    method.network.load_state_dict(tensors)
    method.network.eval()
    return json.loads(meta.get("trained_on", "{}"))


def load_original(method: CIRMethod, encoder, path: Path) -> None:
    """The authors' released network (their checkpoint file, read with ``weights_only=True``) into ``method``;
    one whose widths do not fit ``encoder`` is refused, naming both."""
    try:
        checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such network file") from None
    except Exception as err:  # noqa: BLE001 - torch raises several kinds for a file it cannot read safely
        raise NetworkMismatch(f"{path}: not a checkpoint that loads without unpickling code ({err})") from None
    try:
        state, options = type(method).convert_original(checkpoint)
    except (KeyError, TypeError, AttributeError, ValueError) as err:
        raise NetworkMismatch(f"{path}: not a released {method.name} network ({err})") from None
    method.options.update(options)
    method.network = method.build(encoder)
    try:
        method.network.load_state_dict(state)
    except RuntimeError as err:
        raise NetworkMismatch(f"{path}: its {method.name} network does not fit {encoder.name} (embedding width "
                              f"{encoder.embed_dim}, token width {encoder.token_width}): "
                              f"{str(err).splitlines()[-1].strip()}") from None
    method.network.eval()
