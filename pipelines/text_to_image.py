"""`TextToImagePipeline`: prompt -> text features -> prior samples codes -> tokenizer decodes -> (rerank) -> images.

    pipe = TextToImagePipeline.from_pretrained("models/shapes-demo")
    image = pipe("a blue ball on grass", generator=torch.Generator().manual_seed(0)).images[0]

A pipeline folder holds `pipeline.json` and one subfolder per stage (`vqvae/`, `contrastive/`, `prior/`);
`pipeline.json` names the subfolders and records each stage's `save_id`, so a folder whose stages come from
different saves is refused. Subfolder names must be plain names, and a subfolder (or a file in it) that is a
symlink must stay inside the pipeline folder. It also holds the model's default sampling settings
(`"sampling"`), which calls that leave an argument out use, and those of editing (`"edit_sampling"`, the same
keys; any left out are those of `"sampling"`): redrawing a region against a kept picture is its own task, and
the settings that serve it best differ. Any other key is refused.
"""

from __future__ import annotations

import json
import os
import unicodedata
import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from common.data import image_pixels
from common.grid import to_pil, to_uint8
from common.hub import CONFIG_NAME, ModelLoadError, atomic_write_text, inside, read_json
from contrastive.model import ContrastiveModel
from pipelines.editing import BLEND_EDGE, MaskInput, code_cells, edit_picture, edit_region, soft_edge
from prior.model import Prior, check_sampling_args
from vqvae.model import VQVAE

PIPELINE_NAME = "pipeline.json"
DEMO_MODEL = Path(__file__).resolve().parents[1] / "models" / "shapes-demo"  # the released shapes-world model
STAGES = {"vqvae": VQVAE, "contrastive": ContrastiveModel, "prior": Prior}
PIPELINE_KEYS = {"stages", "sampling", "edit_sampling"}  # what pipeline.json holds, and what each of its stages does:
STAGE_KEYS = {"folder", "save_id"}
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


def standing(values: torch.Tensor) -> torch.Tensor:
    """Each value's standing in its row of `values` (groups, candidates): its z-score among the row's values."""
    return (values - values.mean(1, keepdim=True)) / (values.std(1, keepdim=True) + 1e-6)


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
        groups = standing(groups) + standing(log_likelihoods.float().view(-1, num_candidates).to(groups.device))
    return groups.argmax(1) + torch.arange(len(groups), device=groups.device) * num_candidates


def convert_pixels(pixels: torch.Tensor, output_type: str) -> list[Image.Image] | np.ndarray | torch.Tensor:
    """(B, 3, R, R) in [-1, 1] as PIL images ("pil"), a uint8 (B, R, R, 3) array ("np") or as they are ("pt")."""
    if output_type == "pt":
        return pixels.float().cpu()
    if output_type == "np":
        return to_uint8(pixels)
    return to_pil(pixels)


@dataclass
class TextToImageOutput:
    images: list[Image.Image] | np.ndarray | torch.Tensor  # one per (prompt, image), prompt-major
    codes: torch.Tensor  # (B, h, w)
    scores: torch.Tensor  # (B,) contrastive similarity of each image with its prompt
    null_scores: torch.Tensor  # (B,) contrastive similarity of each image with the empty prompt
    log_likelihoods: torch.Tensor  # (B,) mean log-probability of each image's codes under the prior (nats)
    prompts: list[str]  # the prompt of each image


@dataclass(frozen=True)
class Sampling:
    """One call's sampling settings: the pipeline's defaults with the call's own on top."""

    guidance_scale: float
    temperature: float
    top_k: int | None
    top_p: float | None
    num_candidates: int
    rerank: str

    def prior_args(self) -> dict:
        """The settings `Prior.generate` takes."""
        return {"guidance_scale": self.guidance_scale, "temperature": self.temperature, "top_k": self.top_k,
                "top_p": self.top_p}  # fmt: skip


@dataclass
class Samples:
    """Drawn pictures, one row each, with what reranking needs; `output` makes the pipeline's answer."""

    codes: torch.Tensor  # (B, h, w)
    pixels: torch.Tensor  # (B, 3, R, R) in [-1, 1]
    scores: torch.Tensor  # (B,)
    null_scores: torch.Tensor  # (B,)
    log_likelihoods: torch.Tensor  # (B,)
    prompts: list[str]

    @classmethod
    def cat(cls, parts: list[Samples]) -> Samples:
        tensors = [torch.cat([getattr(part, f.name) for part in parts]) for f in fields(cls) if f.name != "prompts"]
        return cls(*tensors, [prompt for part in parts for prompt in part.prompts])

    def take(self, index: torch.Tensor) -> Samples:
        tensors = [getattr(self, f.name)[index.to(self.codes.device)] for f in fields(self) if f.name != "prompts"]
        return Samples(*tensors, [self.prompts[i] for i in index.tolist()])

    def ranking(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What `best_candidates` ranks by: scores, null scores and log-likelihoods."""
        return self.scores, self.null_scores, self.log_likelihoods

    def output(self, output_type: str) -> TextToImageOutput:
        return TextToImageOutput(
            convert_pixels(self.pixels, output_type),
            self.codes,
            self.scores.float().cpu(),
            self.null_scores.float().cpu(),
            self.log_likelihoods.cpu(),
            self.prompts,
        )


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


def _report(callback: Callable[[int, int], None], batch: int, batches: int, done: int, total: int) -> None:
    """Report a decoding step of one batch of samples as a step of the whole call (every batch takes as many)."""
    callback(batch * total + done, batches * total)


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
    inside(root, root / name)
    return root / name


def _check_keys(found: dict, known: set[str], where: str) -> None:
    unknown = sorted(set(found) - known, key=str)
    if unknown:
        raise ModelLoadError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")


class TextToImagePipeline:
    def __init__(
        self,
        vqvae: VQVAE,
        contrastive: ContrastiveModel,
        prior: Prior,
        sampling: dict | None = None,
        edit_sampling: dict | None = None,
    ) -> None:
        """`sampling`: default sampling settings (any of SAMPLING_DEFAULTS' keys); `pipe.sampling` holds them
        all and can be changed, e.g. `pipe.sampling["top_k"] = None`. `edit_sampling`: those of `edit`, any left
        out taken from `sampling`; `pipe.edit_sampling` holds them all."""
        check_compatible(vqvae, contrastive, prior)
        self.vqvae, self.contrastive, self.prior = vqvae.eval(), contrastive.eval(), prior.eval()
        codebook = prior.config.codebook_size
        self.sampling = check_sampling({} if sampling is None else sampling, codebook)
        if edit_sampling is not None and not isinstance(edit_sampling, dict):
            raise ValueError(f"edit sampling settings must be a JSON object, got {edit_sampling!r}")
        self.edit_sampling = check_sampling({**self.sampling, **(edit_sampling or {})}, codebook)

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
        spec = read_json(inside(root, root / PIPELINE_NAME))
        if not isinstance(spec, dict) or not isinstance(spec.get("stages"), dict):
            raise ModelLoadError(f'{root / PIPELINE_NAME}: expected {{"stages": {{...}}}}')
        _check_keys(spec, PIPELINE_KEYS, str(root / PIPELINE_NAME))
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
            _check_keys(entry, STAGE_KEYS, f"{root / PIPELINE_NAME}: stage {name!r}")
            folder = _stage_dir(root, entry.get("folder"))
            config = read_json(folder / CONFIG_NAME)
            saved = config.get("save_id") if isinstance(config, dict) else None
            if entry.get("save_id") != saved:
                raise ModelLoadError(f"{folder}: saved separately from this pipeline (save_id differs); save it again")
            models[name] = model_class.from_pretrained(folder)
        try:
            return cls(**models, sampling=spec.get("sampling"), edit_sampling=spec.get("edit_sampling"))
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
        spec = {"stages": stages, "sampling": self.sampling, "edit_sampling": self.edit_sampling}
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

        `callback(done, total)` is called after each of the prior's decoding steps, with the steps done and to do
        over the whole call; an exception it raises stops the call."""
        prompts = clean_prompts(prompt)
        settings = self._settings(
            self.sampling,
            guidance_scale=guidance_scale,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            num_candidates=num_candidates,
            rerank=rerank,
        )
        self._check_call(prompts, num_images_per_prompt, output_type, batch_size, generator)
        kept, redraw = self._kept_rows(image, keep_rows, len(prompts))
        samples = self._draw(
            prompts, num_images_per_prompt, settings, generator, kept, redraw, None, show_progress, batch_size, callback
        )
        return samples.output(output_type)

    @torch.inference_mode()
    def edit(
        self,
        image: ImageInput,
        mask: MaskInput,
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
        blend: bool = True,
        fit_what_follows: bool = True,
        output_type: str = "pil",
        show_progress: bool = True,
        batch_size: int = 32,
        callback: Callable[[int, int], None] | None = None,
    ) -> TextToImageOutput:
        """Redraw the part of `image` that `mask` covers for each prompt and keep the rest.

        `mask` is a black-and-white picture (PIL or a 2-D NumPy array) of the image's size, white where to
        redraw, or a box `(left, top, right, bottom)` in the image's pixels. The image (and the mask with it) is
        resized and center-cropped as training images are; every code cell the mask touches is redrawn and every
        other code kept. Sampling settings, `generator` and `num_images_per_prompt` work as in generation;
        settings left out take the model's editing defaults, `self.edit_sampling`.

        The prior draws the redrawn codes in raster order without seeing the kept codes after them, so each
        image is the best of `num_candidates` drawings, and the likelihood that rerankers weigh
        (`rerank="contrastive+likelihood"`) is the prior's likelihood of the whole grid, the kept codes after the
        region included: the drawing that fits what follows wins. `fit_what_follows=False` weighs the likelihood
        of the redrawn codes alone (a plain causal edit). With
        `blend` the images equal the input outside the mask, joined to the redrawn part by a soft edge
        `BLEND_EDGE` pixels wide; `blend=False` returns the tokenizer's drawing of the whole grid. `out.scores`
        and `out.log_likelihoods` are those the candidates were ranked by. `callback` works as in generation."""
        prompts = clean_prompts(prompt)
        settings = self._settings(
            self.edit_sampling,
            guidance_scale=guidance_scale,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            num_candidates=num_candidates,
            rerank=rerank,
        )
        self._check_call(prompts, num_images_per_prompt, output_type, batch_size, generator)
        picture = edit_picture(image)
        resolution = self.vqvae.config.resolution
        region = edit_region(mask, picture.size, resolution).to(self.device)  # (R, R) bool
        pixels = image_pixels(picture, resolution).to(self.device)
        kept = self.vqvae.encode(pixels[None]).flatten(1).expand(len(prompts), -1)
        redraw = code_cells(region, self.prior.config.grid_size).flatten()
        samples = self._draw(
            prompts, num_images_per_prompt, settings, generator, kept, redraw,
            None if fit_what_follows else redraw, show_progress, batch_size, callback,
        )  # fmt: skip
        if blend:
            alpha = soft_edge(region, BLEND_EDGE).to(samples.pixels.dtype)
            samples.pixels = samples.pixels * alpha + pixels * (1 - alpha)
        return samples.output(output_type)

    def _settings(self, defaults: dict, **given: object) -> Sampling:
        """`defaults` (the pipeline's sampling or edit sampling settings) with the settings given (not None) on
        top."""
        chosen = {name: value for name, value in given.items() if value is not None}
        return Sampling(**check_sampling({**defaults, **chosen}, self.prior.config.codebook_size))

    def _check_call(
        self,
        prompts: list[str],
        num_images_per_prompt: int,
        output_type: str,
        batch_size: int,
        generator: torch.Generator | None,
    ) -> None:
        check_count("num_images_per_prompt", num_images_per_prompt)
        check_count("batch_size", batch_size)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(
                f"generator must be a torch.Generator (torch.Generator().manual_seed(0)) or None, got {generator!r}"
            )
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        self._warn_if_truncated(prompts)

    def _draw(
        self,
        prompts: list[str],
        num_images_per_prompt: int,
        settings: Sampling,
        generator: torch.Generator | None,
        kept: torch.Tensor | None,
        redraw: torch.Tensor | None,
        ranked_codes: torch.Tensor | None,
        show_progress: bool,
        batch_size: int,
        callback: Callable[[int, int], None] | None = None,
    ) -> Samples:
        """The best of `settings.num_candidates` samples for each of `num_images_per_prompt` images per prompt.
        `kept` (len(prompts), N): each prompt's code grid, of which the prior redraws the codes where `redraw`
        (N,) is True; without them it draws every code. Candidates are ranked by the likelihood of the codes
        where `ranked_codes` (N,) is True, or of the whole grid."""
        repeats = num_images_per_prompt * settings.num_candidates
        samples = [p for p in prompts for _ in range(repeats)]
        if kept is not None:
            kept = kept.repeat_interleave(repeats, dim=0)  # one row per sample
        null_text = self.contrastive.encode_text([""])
        parts = []
        batches = range(0, len(samples), batch_size)
        for number, start in enumerate(tqdm(batches, desc="generating", disable=not show_progress)):
            texts = samples[start : start + batch_size]
            features, mask = self.contrastive.text_token_features(texts)
            drawn = self.prior.generate(
                features, mask, **settings.prior_args(), generator=generator, show_progress=show_progress,
                codes=None if kept is None else kept[start : start + batch_size], redraw=redraw,
                callback=None if callback is None else partial(_report, callback, number, len(batches)),
            )  # fmt: skip
            images = self.vqvae.decode(drawn.codes)
            embedded = self.contrastive.encode_image(images)
            parts.append(
                Samples(
                    drawn.codes,
                    images,
                    F.cosine_similarity(embedded, self.contrastive.encode_text(texts), dim=-1),
                    F.cosine_similarity(embedded, null_text, dim=-1),
                    drawn.log_likelihood(ranked_codes),
                    texts,
                )
            )
        drawn = Samples.cat(parts)
        if settings.num_candidates > 1:  # keep the best candidate of each group
            drawn = drawn.take(best_candidates(*drawn.ranking(), settings.num_candidates, settings.rerank))
        return drawn

    def _kept_rows(
        self, image: object, keep_rows: int | None, count: int
    ) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
        """(count, N) codes of each prompt's image and (N,) bool: the codes below the top `keep_rows` rows, which
        completion redraws; (None, None) without images."""
        if image is None:
            if keep_rows is not None:
                raise ValueError("keep_rows needs an image to complete")
            return None, None
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
        codes = self.vqvae.encode(pixels).flatten(1).expand(count, -1)
        return codes, torch.arange(grid * grid, device=self.device) >= keep_rows * grid

    def _warn_if_truncated(self, prompts: list[str]) -> None:
        length = self.contrastive.config.context_length
        tokenizer = self.contrastive.tokenizer
        for i, text in enumerate(prompts):
            if len(tokenizer.encode(text)) + 2 > length:
                warnings.warn(f"prompt {i} is longer than {length} tokens; the end is cut off", stacklevel=5)
