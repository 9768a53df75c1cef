"""Feature extractors of the four metrics: ``features(images) -> Tensor``, loaded once, batched.

Each model is a setting (hub id, open_clip name/tag, or a local folder/file). A model that cannot be
found locally (and, offline, cannot be downloaded) raises ``ValueError`` naming the setting to change.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageOps
from torchvision.transforms import functional as TF

METRICS = ("dino", "clip_i", "clip_t", "lpips_div", "lpips_ref", "drift")
DEFAULT_METRICS = METRICS[:5]  # drift needs base-model images: opt-in (or a protocol that lists it)
PAIRINGS = ("all", "matched")  # every photo x every image | prompt k's images x photo k (PEFT's test pairs)
LPIPS_RESIZES = ("crop", "squash")  # shorter side to the size, then a center crop | both sides (HRA's)


@dataclass(frozen=True)
class MetricConfig:
    dino_model: str = "facebook/dino-vits16"  # hub id or folder: transformers ViTModel + image processor
    clip_model: str = (
        "ViT-B-32"  # open_clip name ("ViT-L-14" matches the seed's numbers) or a local-dir folder
    )
    clip_pretrained: str | None = "openai"  # open_clip tag or checkpoint file; unused for a folder
    lpips_net: str = "alex"  # LPIPS trunk: alex | vgg | squeeze
    lpips_model: str | None = None  # full LPIPS state dict file; None: ImageNet trunk + lpips' linear weights
    lpips_size: int = 256  # LPIPS compares images resized (shorter side) and center-cropped to this size
    lpips_resize: str = "crop"  # "squash": resized to lpips_size x lpips_size, aspect and center_crop ignored
    center_crop: bool = True  # square center crop before every metric: real photos need not be square
    device: str | None = None  # None: cuda when present, else cpu
    batch_size: int = 32
    metrics: tuple[str, ...] = field(default=DEFAULT_METRICS)
    pairing: str = "all"  # dino/clip_i/lpips_ref pairs: every photo x every image, or "matched" (PAIRINGS)

    def __post_init__(self) -> None:
        object.__setattr__(self, "metrics", tuple(self.metrics))
        unknown = sorted(set(self.metrics) - set(METRICS))
        if unknown or not self.metrics:
            raise ValueError(
                f"metrics must be a non-empty subset of {list(METRICS)}, got {list(self.metrics)}"
            )
        if self.pairing not in PAIRINGS:
            raise ValueError(f"pairing must be one of {', '.join(PAIRINGS)}, got {self.pairing!r}")
        if self.lpips_resize not in LPIPS_RESIZES:
            raise ValueError(f"lpips_resize must be crop or squash, got {self.lpips_resize!r}")
        if self.lpips_net not in ("alex", "vgg", "squeeze"):
            raise ValueError(f"lpips_net must be alex, vgg or squeeze, got {self.lpips_net!r}")
        if self.batch_size < 1 or self.lpips_size < 32:
            raise ValueError(
                f"batch_size must be >= 1 and lpips_size >= 32, got {self.batch_size}, {self.lpips_size}"
            )

    def describe(self) -> dict:
        """The protocol settings that change the numbers (written into every report)."""
        return {
            "dino_model": self.dino_model,
            "clip_model": self.clip_model,
            "clip_pretrained": self.clip_pretrained,
            "lpips_net": self.lpips_net,
            "lpips_model": self.lpips_model,
            "lpips_size": self.lpips_size,
            "center_crop": self.center_crop,
            # non-default values only: the fingerprints of earlier reports stay valid
            **({"pairing": self.pairing} if self.pairing != "all" else {}),
            **({"lpips_resize": self.lpips_resize} if self.lpips_resize != "crop" else {}),
        }


def open_image(path: str | os.PathLike) -> Image.Image:
    """An RGB image with its EXIF orientation applied (phone photos are often stored rotated)."""
    try:
        with Image.open(path) as im:
            return ImageOps.exif_transpose(im).convert("RGB")
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None


def _square(image: Image.Image, center_crop: bool) -> Image.Image:
    image = image.convert("RGB")
    if center_crop and image.width != image.height:
        side = min(image.size)
        image = TF.center_crop(image, [side, side])
    return image


def _batches(items: Sequence, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


class DinoFeatures:
    """DINO ViT CLS token of the last hidden state (not the pooler), as in the DreamBooth protocol; a
    DINOv2 folder or hub id (``facebook/dinov2-base``) gives its CLS token the same way, as PEFT's does."""

    def __init__(
        self, name: str, device: torch.device, batch_size: int = 32, center_crop: bool = True
    ) -> None:
        from transformers import AutoConfig, AutoImageProcessor, AutoModel, ViTModel
        from transformers.utils import logging as hf_logging

        verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()  # the hub checkpoint's pooler weights are unused: CLS token only
        hf_logging.disable_progress_bar()
        try:
            self.processor = AutoImageProcessor.from_pretrained(name)
            if AutoConfig.from_pretrained(name).model_type == "vit":  # DINO v1: ViTModel, no pooler
                self.model = ViTModel.from_pretrained(name, add_pooling_layer=False).to(device).eval()
            else:  # DINOv2 (PEFT's image-gen benchmark): the same CLS token of the last hidden state
                self.model = AutoModel.from_pretrained(name).to(device).eval()
        except (OSError, ValueError) as e:
            raise ValueError(
                f"DINO model {name!r} not found (hub id offline and not cached, or not a ViT folder; "
                f"set dino_model to a local folder): {_one_line(e)}"
            ) from None
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()
        self.device, self.batch_size, self.center_crop = device, batch_size, center_crop

    @torch.no_grad()
    def features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        out = []
        for batch in _batches(images, self.batch_size):
            pixels = self.processor(
                images=[_square(im, self.center_crop) for im in batch], return_tensors="pt"
            )
            hidden = self.model(pixel_values=pixels["pixel_values"].to(self.device)).last_hidden_state
            out.append(hidden[:, 0].float().cpu())  # (B, T, D) -> (B, D): the CLS token
        return torch.cat(out) if out else torch.zeros(0, self.model.config.hidden_size)


class ClipFeatures:
    """open_clip image and text embeddings (CLIP-I, CLIP-T)."""

    def __init__(
        self,
        name: str,
        pretrained: str | None,
        device: torch.device,
        batch_size: int = 32,
        center_crop: bool = True,
    ) -> None:
        import open_clip

        model_name = f"local-dir:{name}" if Path(name).is_dir() else name
        if model_name.startswith("local-dir:"):
            pretrained = None  # the folder holds config and weights
        try:
            model, _, self.preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=pretrained, device=device, require_pretrained=True
            )
            self.tokenizer = open_clip.get_tokenizer(model_name)
        except (OSError, RuntimeError, ValueError) as e:
            raise ValueError(
                f"CLIP model {name!r} (pretrained={pretrained!r}) not found (offline and not cached? "
                f"set clip_model to a folder or clip_pretrained to a file): {_one_line(e)}"
            ) from None
        self.model = model.eval()
        self.device, self.batch_size, self.center_crop = device, batch_size, center_crop

    @torch.no_grad()
    def features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        out = []
        for batch in _batches(images, self.batch_size):
            pixels = torch.stack(
                [self.preprocess(_square(im, self.center_crop)) for im in batch]
            )  # (B, 3, H, W)
            out.append(self.model.encode_image(pixels.to(self.device)).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.model.text_projection.shape[-1])

    @torch.no_grad()
    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        out = [
            self.model.encode_text(self.tokenizer(list(batch)).to(self.device)).float().cpu()
            for batch in _batches(texts, self.batch_size)
        ]
        return torch.cat(out)


class LpipsFeatures:
    """LPIPS split in two: per-image trunk features (computed once) and distances between features.

    ``pairwise(features(x), features(y))[i, j]`` equals ``lpips.LPIPS(x_i, y_j)``: the trunk runs once per
    image instead of twice per pair, which matters for the all-pairs real-vs-generated score.
    """

    def __init__(
        self,
        net: str,
        model_path: str | None,
        device: torch.device,
        size: int = 256,
        batch_size: int = 32,
        center_crop: bool = True,
        resize: str = "crop",
    ) -> None:
        import lpips

        if resize not in LPIPS_RESIZES:
            raise ValueError(f"LPIPS resize must be crop or squash, got {resize!r}")
        with warnings.catch_warnings():
            warnings.simplefilter(
                "ignore", UserWarning
            )  # torchvision's deprecated `pretrained=` inside lpips
            if model_path is None:
                try:
                    self.model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=False, verbose=False)
                except Exception as e:  # torchvision's download raises URLError/OSError/RuntimeError offline
                    raise ValueError(
                        f"LPIPS {net} trunk weights are not in the torch hub cache and cannot be "
                        f"downloaded (set lpips_model to a saved LPIPS state dict): {_one_line(e)}"
                    ) from None
            else:
                with torch.device("meta"):  # no random init of the trunk (AlexNet's unused classifier is 58M)
                    self.model = lpips.LPIPS(net=net, pretrained=False, pnet_rand=True, verbose=False)
                self._load(Path(model_path))
        self.model = self.model.to(device).eval()
        self.normalize_tensor = lpips.normalize_tensor
        self.device, self.size, self.batch_size, self.center_crop = device, size, batch_size, center_crop
        self.resize = resize

    def _load(self, path: Path) -> None:
        if not path.is_file():
            raise ValueError(f"LPIPS model file not found: {path}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle/zip errors for a file that is not a state dict
            raise ValueError(f"cannot read LPIPS state dict {path}: {_one_line(e)}") from None
        own = self.model.state_dict()
        missing = sorted(set(own) - set(state)) if isinstance(state, dict) else sorted(own)
        if missing:
            raise ValueError(
                f"{path} is not a full LPIPS {self.model.pnet_type} state dict: "
                f"{len(missing)} keys missing (e.g. {missing[:2]})"
            )
        try:
            self.model.load_state_dict({k: state[k] for k in own}, assign=True)
        except RuntimeError as e:
            raise ValueError(f"{path} does not fit LPIPS {self.model.pnet_type}: {_one_line(e)}") from None

    def _pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        if self.resize == "squash":  # HRA's evaluate.py: Resize((512, 512)) of the whole image, no crop
            ims = [TF.resize(im.convert("RGB"), [self.size, self.size]) for im in images]
        else:
            ims = [
                TF.center_crop(TF.resize(_square(im, self.center_crop), self.size), [self.size, self.size])
                for im in images
            ]
        return (
            torch.stack([TF.to_tensor(im) for im in ims]) * 2 - 1
        )  # (B, 3, S, S) in [-1, 1], as LPIPS expects

    @torch.no_grad()
    def features(self, images: Sequence[Image.Image]) -> list[torch.Tensor]:
        """Unit-normalised trunk activations, one (N, C_l, H_l, W_l) tensor per LPIPS layer."""
        per_batch = []
        for batch in _batches(images, self.batch_size):
            x = self._pixels(batch).to(self.device)
            outs = self.model.net(self.model.scaling_layer(x))
            per_batch.append([self.normalize_tensor(o) for o in outs])
        return [torch.cat(layer) for layer in zip(*per_batch, strict=True)]

    @torch.no_grad()
    def pairwise(self, a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
        """LPIPS distance of every a[i] with every b[j] -> (N, M), equal to ``lpips.LPIPS(x_i, y_j)``.

        Per layer LPIPS is mean_hw Σ_c w_c (a_c - b_c)² with w the 1×1 conv of its linear layer; expanding
        the square turns all pairs into one matmul instead of one (C, H, W) difference per pair.
        """
        total = 0
        for lin, fa, fb in zip(self.model.lins, a, b, strict=True):
            w = lin.model[-1].weight.double().reshape(1, -1, 1, 1)  # (1, C, 1, 1): NetLinLayer's 1x1 conv
            fa, fb = fa.double(), fb.double()  # float64: the expanded square cancels for near pairs
            hw = fa.shape[2] * fa.shape[3]
            sq_a = (w * fa * fa).sum(dim=(1, 2, 3)) / hw  # (N,)
            sq_b = (w * fb * fb).sum(dim=(1, 2, 3)) / hw  # (M,)
            cross = (w * fa).flatten(1) @ fb.flatten(1).T / hw  # (N, C·H·W) @ (C·H·W, M) -> (N, M)
            total = total + sq_a[:, None] + sq_b[None, :] - 2 * cross
        return total.float().cpu()
