"""`TextToImagePipeline`: prompt -> text features -> prior samples codes -> tokenizer decodes -> (rerank) -> images.

    pipe = TextToImagePipeline.from_pretrained("models/shapes-demo")
    image = pipe("a blue ball on grass", generator=torch.Generator().manual_seed(0)).images[0]

A pipeline folder holds `pipeline.json` and one subfolder per stage (`vqvae/`, `contrastive/`, `prior/`);
`pipeline.json` names the subfolders and records each stage's `save_id`, so a folder whose stages come from
different saves is refused. Subfolder names must be plain names inside the pipeline folder. It also holds
the model's default sampling settings (`"sampling"`), which calls that leave an argument out use.
"""

from __future__ import annotations

import json
import os
import unicodedata
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from common.data import image_pixels
from common.grid import to_pil, to_uint8
from common.hub import CONFIG_NAME, ModelLoadError, atomic_write_text, read_json
from contrastive.model import ContrastiveModel
from prior.model import Prior, check_sampling_args
from vqvae.model import VQVAE

PIPELINE_NAME = "pipeline.json"
DEMO_MODEL = Path(__file__).resolve().parents[1] / "models" / "shapes-demo"  # the released shapes-world model
STAGES = {"vqvae": VQVAE, "contrastive": ContrastiveModel, "prior": Prior}
OUTPUT_TYPES = ("pil", "np", "pt")
ImageInput = Image.Image | str | os.PathLike  # a picture to complete: a PIL image or the path to one
SAMPLING_DEFAULTS = {
    "guidance_scale": 3.0,
    "temperature": 1.0,
    "top_k": None,
    "top_p": None,
    "num_candidates": 1,
    "rerank": "contrastive",
}
# How the best of `num_candidates` samples is chosen: by contrastive score alone (as DALL-E did); by the sum of
# its standing among its group's candidates (z-score) in contrastive score and in the prior's likelihood; or by
# how much more it matches its prompt than the empty prompt (contrastive score less the null score), so that a
# picture that would score well against any caption does not win.
RERANKERS = ("contrastive", "contrastive+likelihood", "contrastive-null")


def check_count(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 4096:
        raise ValueError(f"{name} must be an integer from 1 to 4096, got {value!r}")


def check_sampling(sampling: object, codebook_size: int) -> dict:
    """Default sampling settings, completed from SAMPLING_DEFAULTS; raises ValueError naming a bad one."""
    if not isinstance(sampling, dict):
        raise ValueError(f"sampling settings must be a JSON object, got {sampling!r}")
    unknown = sorted(set(sampling) - set(SAMPLING_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown sampling setting(s) {unknown}; known: {sorted(SAMPLING_DEFAULTS)}")
    merged = {**SAMPLING_DEFAULTS, **sampling}
    check_sampling_args(
        codebook_size, merged["temperature"], merged["top_k"], merged["top_p"], merged["guidance_scale"]
    )
    check_count("num_candidates", merged["num_candidates"])
    if merged["rerank"] not in RERANKERS:
        raise ValueError(f"rerank must be one of {RERANKERS}, got {merged['rerank']!r}")
    return merged


def best_candidates(
    scores: torch.Tensor,
    null_scores: torch.Tensor,
    log_likelihoods: torch.Tensor,
    num_candidates: int,
    rerank: str,
) -> torch.Tensor:
    """Index of the kept sample of each consecutive group of `num_candidates`, by the `rerank` rule."""
    groups = scores.float().view(-1, num_candidates)
    if rerank == "contrastive-null":
        groups = groups - null_scores.float().view(-1, num_candidates).to(groups.device)
    elif rerank == "contrastive+likelihood":

        def standing(values: torch.Tensor) -> torch.Tensor:
            return (values - values.mean(1, keepdim=True)) / (values.std(1, keepdim=True) + 1e-6)

        groups = standing(groups) + standing(log_likelihoods.float().view(-1, num_candidates).to(groups.device))
    return groups.argmax(1) + torch.arange(len(groups), device=groups.device) * num_candidates


@dataclass
class TextToImageOutput:
    images: list[Image.Image] | np.ndarray | torch.Tensor  # one per (prompt, image), prompt-major
    codes: torch.Tensor  # (B, h, w)
    scores: torch.Tensor  # (B,) contrastive similarity of each image with its prompt
    null_scores: torch.Tensor  # (B,) contrastive similarity of each image with the empty prompt
    log_likelihoods: torch.Tensor  # (B,) mean log-probability of each image's codes under the prior (nats)
    prompts: list[str]  # the prompt of each image


def check_compatible(vqvae: VQVAE, contrastive: ContrastiveModel, prior: Prior) -> None:
    """Raise ValueError naming the first way the three stages do not fit together."""
    p = prior.config
    checks = [
        ("codebook size", p.codebook_size, "tokenizer", vqvae.config.codebook_size),
        ("code grid side", p.grid_size, "tokenizer", vqvae.config.grid_size),
        ("text width", p.text_width, "contrastive text encoder", contrastive.config.text_width),
        ("text length", p.text_length, "contrastive context length", contrastive.config.context_length),
        ("image resolution", vqvae.config.resolution, "contrastive model", contrastive.config.resolution),
    ]
    for what, ours, other, theirs in checks:
        if ours != theirs:
            where = "tokenizer" if what == "image resolution" else "prior"
            raise ValueError(f"the stages do not fit: the {where}'s {what} is {ours} but the {other}'s is {theirs}")


def clean_prompts(prompt: str | list[str], max_chars: int = 1000) -> list[str]:
    """Validate prompts: strings only, not empty; control characters become spaces; long ones are cut with a
    warning."""
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompt must be a string or a non-empty list of strings")
    cleaned = []
    for i, text in enumerate(prompts):
        if not isinstance(text, str):
            raise ValueError(f"prompt {i} is a {type(text).__name__}, not a string")
        text = "".join(" " if unicodedata.category(ch).startswith("C") else ch for ch in text)
        text = " ".join(text.split())
        if not text:
            raise ValueError(f"prompt {i} is empty")
        if len(text) > max_chars:
            warnings.warn(f"prompt {i} has {len(text)} characters; using the first {max_chars}", stacklevel=4)
            text = text[:max_chars]
        cleaned.append(text)
    return cleaned


def _report(callback: Callable[[int, int], None], before: int, total: int, done: int, _steps: int) -> None:
    """Report one batch's drawing step as a step of the whole call."""
    callback(before + done, total)


def _stage_dir(root: Path, name: str) -> Path:
    """A stage's subfolder, refusing names that leave the pipeline folder."""
    if (
        not isinstance(name, str)
        or not name
        or Path(name).is_absolute()
        or Path(name).name != name
        or name in (".", "..")
    ):
        raise ModelLoadError(f"{root / PIPELINE_NAME}: stage folder {name!r} must be a plain folder name")
    return root / name


class TextToImagePipeline:
    def __init__(self, vqvae: VQVAE, contrastive: ContrastiveModel, prior: Prior, sampling: dict | None = None) -> None:
        """`sampling`: default sampling settings (any of SAMPLING_DEFAULTS' keys); `pipe.sampling` holds them
        all and can be changed, e.g. `pipe.sampling["top_k"] = None`."""
        check_compatible(vqvae, contrastive, prior)
        self.vqvae, self.contrastive, self.prior = vqvae.eval(), contrastive.eval(), prior.eval()
        self.sampling = check_sampling({} if sampling is None else sampling, prior.config.codebook_size)

    # ------------------------------------------------------------ loading and saving

    @classmethod
    def from_stages(
        cls, vqvae: str | os.PathLike, contrastive: str | os.PathLike, prior: str | os.PathLike
    ) -> TextToImagePipeline:
        """From three separately trained model folders."""
        return cls(
            VQVAE.from_pretrained(vqvae), ContrastiveModel.from_pretrained(contrastive), Prior.from_pretrained(prior)
        )

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> TextToImagePipeline:
        """From a pipeline folder (`pipeline.json` + one subfolder per stage)."""
        root = Path(path)
        spec = read_json(root / PIPELINE_NAME)
        if not isinstance(spec, dict) or not isinstance(spec.get("stages"), dict):
            raise ModelLoadError(f'{root / PIPELINE_NAME}: expected {{"stages": {{...}}}}')
        stages = spec["stages"]
        if set(stages) != set(STAGES):
            raise ModelLoadError(
                f"{root / PIPELINE_NAME}: stages must be exactly {sorted(STAGES)}, got {sorted(stages)}"
            )
        models = {}
        for name, model_class in STAGES.items():
            entry = stages[name]
            if not isinstance(entry, dict):
                raise ModelLoadError(f"{root / PIPELINE_NAME}: stage {name!r} must be an object")
            folder = _stage_dir(root, entry.get("folder"))
            config = read_json(folder / CONFIG_NAME)
            saved = config.get("save_id") if isinstance(config, dict) else None
            if entry.get("save_id") != saved:
                raise ModelLoadError(f"{folder}: saved separately from this pipeline (save_id differs); save it again")
            models[name] = model_class.from_pretrained(folder)
        try:
            return cls(**models, sampling=spec.get("sampling"))
        except ValueError as err:
            raise ModelLoadError(f"{root / PIPELINE_NAME}: {err}") from err

    def save_pretrained(self, path: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
        """Write each stage into its subfolder, then `pipeline.json` (last, atomically). `dtype=torch.float16`
        stores the weights at half the size (see `PretrainedModel.save_pretrained`)."""
        root = Path(path)
        stages = {}
        for name in STAGES:
            folder = getattr(self, name).save_pretrained(root / name, dtype)
            stages[name] = {"folder": name, "save_id": read_json(folder / CONFIG_NAME)["save_id"]}
        spec = {"stages": stages, "sampling": self.sampling}
        atomic_write_text(root / PIPELINE_NAME, json.dumps(spec, indent=2) + "\n")
        return root

    def to(self, device: str | torch.device) -> TextToImagePipeline:
        for name in STAGES:
            getattr(self, name).to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.prior.parameters()).device

    # ------------------------------------------------------------ generation

    @torch.inference_mode()
    def __call__(
        self,
        prompt: str | list[str],
        *,
        num_images_per_prompt: int = 1,
        guidance_scale: float | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        num_candidates: int | None = None,
        rerank: str | None = None,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        show_progress: bool = True,
        batch_size: int = 32,
        image: ImageInput | list[ImageInput] | None = None,
        keep_rows: int | None = None,
        callback: Callable[[int, int], None] | None = None,
    ) -> TextToImageOutput:
        """Generate `num_images_per_prompt` images per prompt. With `num_candidates` > 1, each image is the best
        of that many samples (reranking): by contrastive similarity to its prompt (`rerank="contrastive"`), by
        that and the prior's likelihood of its codes together (`"contrastive+likelihood"`), or by that less
        its similarity to the empty prompt (`"contrastive-null"`). Sampling
        arguments left out (None) take the pipeline's defaults, `self.sampling`.

        With `image` (a PIL image or a path to one, or a list of them, one per prompt), every image completes
        its prompt's: it keeps the top `keep_rows` rows of the image's codes (default: half of them) and the
        prior draws the rest for the prompt. The kept part comes back as the tokenizer draws it.

        `callback(done, total)` is called after each code the prior draws for a batch of samples, with the
        drawing steps done and to do over the whole call; an exception it raises stops the call."""
        prompts = clean_prompts(prompt)
        kept = self._kept_codes(image, keep_rows, len(prompts))
        given = {
            "guidance_scale": guidance_scale,
            "temperature": temperature,
            "top_k": top_k,
            "top_p": top_p,
            "num_candidates": num_candidates,
            "rerank": rerank,
        }
        settings = {**self.sampling, **{name: value for name, value in given.items() if value is not None}}
        settings = check_sampling(settings, self.prior.config.codebook_size)  # as the stored defaults are
        guidance_scale, temperature, top_k, top_p, num_candidates, rerank = (
            settings[name] for name in SAMPLING_DEFAULTS
        )
        check_count("num_images_per_prompt", num_images_per_prompt)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        self._warn_if_truncated(prompts)

        per_image = [p for p in prompts for _ in range(num_images_per_prompt)]
        samples = [p for p in per_image for _ in range(num_candidates)]
        if kept is not None:
            kept = kept.repeat_interleave(num_images_per_prompt * num_candidates, dim=0)  # one row per sample
        codes, pixels, scores, null_scores, log_likelihoods = [], [], [], [], []
        null_text = self.contrastive.encode_text([""])
        steps = self.prior.config.num_codes - (0 if kept is None else kept.shape[1])  # drawn per batch
        total = -(-len(samples) // batch_size) * steps
        for start in tqdm(range(0, len(samples), batch_size), desc="generating", disable=not show_progress):
            texts = samples[start : start + batch_size]
            features, mask = self.contrastive.text_token_features(texts)
            batch_codes, batch_log_likelihoods = self.prior.generate(
                features, mask, temperature=temperature, top_k=top_k, top_p=top_p, guidance_scale=guidance_scale,
                generator=generator, show_progress=show_progress, return_log_likelihood=True,
                prefix_codes=None if kept is None else kept[start : start + batch_size],
                callback=None if callback is None else partial(_report, callback, start // batch_size * steps, total),
            )  # fmt: skip
            images = self.vqvae.decode(batch_codes)
            codes.append(batch_codes)
            pixels.append(images)
            embedded = self.contrastive.encode_image(images)
            scores.append(F.cosine_similarity(embedded, self.contrastive.encode_text(texts), dim=-1))
            null_scores.append(F.cosine_similarity(embedded, null_text, dim=-1))
            log_likelihoods.append(batch_log_likelihoods)
        results = [torch.cat(values) for values in (codes, pixels, scores, null_scores, log_likelihoods)]
        if num_candidates > 1:  # keep the best candidate of each group
            best = best_candidates(*results[2:], num_candidates=num_candidates, rerank=rerank)
            results = [values[best.to(values.device)] for values in results]
        codes_t, pixels_t, scores_t, null_scores_t, log_likelihoods_t = results
        return TextToImageOutput(
            self._convert(pixels_t, output_type),
            codes_t,
            scores_t.float().cpu(),
            null_scores_t.float().cpu(),
            log_likelihoods_t.cpu(),
            per_image,
        )

    def _kept_codes(self, image: object, keep_rows: int | None, count: int) -> torch.Tensor | None:
        """(count, keep_rows * grid) codes of the top rows of each prompt's image, or None without images."""
        if image is None:
            if keep_rows is not None:
                raise ValueError("keep_rows needs an image to complete")
            return None
        grid = self.prior.config.grid_size
        keep_rows = grid // 2 if keep_rows is None else keep_rows
        if not isinstance(keep_rows, int) or isinstance(keep_rows, bool) or not 1 <= keep_rows < grid:
            raise ValueError(
                f"keep_rows must be an integer from 1 to {grid - 1} (codes have {grid} rows), got {keep_rows!r}"
            )
        images = list(image) if isinstance(image, (list, tuple)) else [image]
        if len(images) not in (1, count):
            raise ValueError(f"got {len(images)} images for {count} prompts: give one image, or one per prompt")
        resolution = self.vqvae.config.resolution
        pixels = torch.stack([image_pixels(one, resolution) for one in images]).to(self.device)
        return self.vqvae.encode(pixels)[:, :keep_rows].flatten(1).expand(count, -1)

    def _warn_if_truncated(self, prompts: list[str]) -> None:
        length = self.contrastive.config.context_length
        tokenizer = self.contrastive.tokenizer
        for i, text in enumerate(prompts):
            if len(tokenizer.encode(text)) + 2 > length:
                warnings.warn(f"prompt {i} is longer than {length} tokens; the end is cut off", stacklevel=4)

    @staticmethod
    def _convert(pixels: torch.Tensor, output_type: str):
        if output_type == "pt":
            return pixels.float().cpu()
        if output_type == "np":
            return to_uint8(pixels)
        return to_pil(pixels)
