"""Train the prior over image codes, conditioned on the frozen contrastive text encoder.

    accelerate launch -m prior.train --vqvae runs/vqvae --contrastive runs/contrastive \
        --train_data_dir data/shapes --output_dir runs/prior --preset small --max_train_steps 5000

The data is encoded once by the tokenizer into a codes folder (`--codes_cache`, default OUTPUT_DIR/codes),
which later runs and resumed runs reuse; one made with another tokenizer or from other data is refused. The
prior's code grid and codebook come from the tokenizer, its text width and length from the text encoder, and
`--resolution` defaults to the tokenizer's. Captions go through the frozen text encoder in every step; the
features of each distinct caption are kept (up to `--text_cache_mb`), since captions repeat.

Writes checkpoints, `metrics.jsonl` (loss and bits per code), sample grids for `--sample_prompts` under
OUTPUT_DIR/samples, and at the end the prior (config.json + model.safetensors), `samples.png` and `eval.json`
(bits per code on the validation split) to OUTPUT_DIR.
"""

from __future__ import annotations

import argparse
import datetime
import math
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import set_seed
from PIL import Image

from common.cli import ArgumentParser
from common.data import DataConfig
from common.grid import make_grid, to_pil
from common.training import (
    Trainer,
    TrainerHooks,
    TrainingConfig,
    add_training_args,
    run_script,
    set_cpu_threads,
    write_eval,
)
from contrastive.model import ContrastiveConfig, ContrastiveModel
from prior.codes import cached_codes
from prior.model import PRESETS, Prior, PriorConfig, check_sampling_args
from vqvae.model import VQVAE, VQVAEConfig

SAMPLE_PROMPTS = (
    "a blue ball on grass",
    "a red star in the night sky",
    "a large yellow box on sand",
    "a small white heart in the sky",
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(prog="prior.train", description=__doc__.splitlines()[0])
    stages = parser.add_argument_group("frozen stages")
    stages.add_argument("--vqvae", required=True, help="the trained tokenizer's folder")
    stages.add_argument("--contrastive", required=True, help="the trained contrastive encoder's folder")
    stages.add_argument("--codes_cache", help="folder of the encoded data (default OUTPUT_DIR/codes)")
    stages.add_argument("--text_cache_mb", type=float, default=1024, help="memory for cached caption features")
    model = parser.add_argument_group("model")
    model.add_argument("--preset", choices=sorted(PRESETS), default="small", help="named model config")
    model.add_argument("--model_config", help="JSON object of config fields overriding the preset")
    model.add_argument(
        "--cond_drop_prob", type=float, help="fraction of rows trained without their caption (default: the config's)"
    )
    model.add_argument("--eval_rows", type=int, default=1000, help="validation rows for bits per code in training")
    samples = parser.add_argument_group("samples")
    samples.add_argument("--sample_prompts", nargs="+", default=list(SAMPLE_PROMPTS), help="captions to sample")
    samples.add_argument("--samples_per_prompt", type=int, default=2)
    samples.add_argument(
        "--guidance_scale", type=float, default=3.0, help="classifier-free guidance (needs --cond_drop_prob > 0)"
    )
    add_training_args(parser, learning_rate=3e-4, train_batch_size=64, max_train_steps=5000, resolution=None)
    args = parser.parse_args(argv)
    for name in ("eval_rows", "samples_per_prompt"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if not args.text_cache_mb >= 0:
        parser.error(f"--text_cache_mb must be >= 0, got {args.text_cache_mb}")
    return args


def prior_config(args: argparse.Namespace, vqvae: VQVAEConfig, text: ContrastiveConfig) -> PriorConfig:
    """The preset with `--cond_drop_prob` and `--model_config` applied, and the fields that must match the frozen
    stages taken from them; an override that contradicts a stage or the flag is refused, naming the field."""
    fixed = {
        "codebook_size": (vqvae.codebook_size, f"the tokenizer ({args.vqvae})"),
        "grid_size": (vqvae.grid_size, f"the tokenizer ({args.vqvae})"),
        "text_width": (text.text_width, f"the text encoder ({args.contrastive})"),
        "text_length": (text.context_length, f"the text encoder ({args.contrastive})"),
    }
    if args.cond_drop_prob is not None:
        fixed["cond_drop_prob"] = (args.cond_drop_prob, "--cond_drop_prob")
    config = PRESETS[args.preset].replace({name: value for name, (value, _) in fixed.items()})
    config = config.replace_json(args.model_config)
    for name, (value, owner) in fixed.items():
        if getattr(config, name) != value:
            raise ValueError(f"--model_config sets {name}={getattr(config, name)!r}, but {owner} has {name}={value!r}")
    return config


class TextFeatures:
    """The frozen text encoder's per-token features and padding mask for a list of captions, with the features of
    recently used captions kept on the encoder's device (least recently used ones dropped beyond `cache_mb`)."""

    def __init__(self, encoder: ContrastiveModel, cache_mb: float) -> None:
        c = encoder.config
        self.encoder = encoder
        self.max_entries = int(cache_mb * 2**20) // (c.context_length * (4 * c.text_width + 1))
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._cache)

    @torch.no_grad()  # not inference mode: cached features are also inputs of training steps
    def __call__(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, context_length, text_width) features and (B, context_length) bool mask."""
        new = [text for text in dict.fromkeys(texts) if text not in self._cache]
        found = {}
        if new:
            features, mask = self.encoder.text_token_features(new)
            found = {text: (f.clone(), m.clone()) for text, f, m in zip(new, features, mask, strict=True)}
        rows = [self._cache[text] if text in self._cache else found[text] for text in texts]
        for text in dict.fromkeys(texts):  # (re)inserted: now the most recently used
            self._cache[text] = found[text] if text in found else self._cache.pop(text)
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)
        return torch.stack([f for f, _ in rows]), torch.stack([m for _, m in rows])


def make_loss(text: TextFeatures):
    def compute_loss(model: torch.nn.Module, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        features, mask = text(batch["text"])
        _, loss = model(batch["codes"], features, targets=batch["codes"], text_mask=mask, drop=batch.get("drop"))
        return loss, {"bits_per_code": loss.detach() / math.log(2)}

    return compute_loss


@torch.no_grad()
def bits_per_code(prior: Prior, dataset: torch.utils.data.Dataset, text: TextFeatures, batch_size: int) -> float:
    """Mean cross entropy of the codes of `dataset` given their captions, in bits per code."""
    prior.eval()
    device = next(prior.parameters()).device
    total, rows = 0.0, 0
    for batch in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
        features, mask = text(batch["text"])
        codes = batch["codes"].to(device)
        _, loss = prior(codes, features, targets=codes, text_mask=mask)
        total += loss.item() * len(codes)
        rows += len(codes)
    if not rows:
        raise ValueError("cannot evaluate on an empty dataset")
    return total / rows / math.log(2)


@torch.no_grad()
def sample_grid(
    prior: Prior,
    vqvae: VQVAE,
    text: TextFeatures,
    prompts: Sequence[str],
    samples_per_prompt: int,
    guidance_scale: float,
    seed: int,
) -> Image.Image:
    """`samples_per_prompt` images for each prompt (one column per prompt), sampled with a fixed seed and
    labelled with their prompt."""
    prior.eval()
    captions = list(prompts) * samples_per_prompt
    features, mask = text(captions)
    generator = torch.Generator(features.device).manual_seed(seed)
    codes = prior.generate(features, mask, guidance_scale=guidance_scale, generator=generator).codes
    return make_grid(to_pil(vqvae.decode(codes)), captions, columns=len(prompts))


def main(argv: Sequence[str] | None = None) -> dict[str, float] | None:
    args = parse_args(argv)
    settings = TrainingConfig.from_args(args)  # refuses bad training flags before the data is read
    set_cpu_threads(settings)
    # the Trainer's Accelerator joins this state; encoding the codes may keep one process waiting for the others
    # longer than a collective's default timeout
    state = PartialState(cpu=not torch.cuda.is_available(), timeout=datetime.timedelta(hours=12))
    vqvae = VQVAE.from_pretrained(args.vqvae, state.device).requires_grad_(False)
    encoder = ContrastiveModel.from_pretrained(args.contrastive, state.device).requires_grad_(False)
    if args.resolution is None:
        args.resolution = vqvae.config.resolution
    elif args.resolution != vqvae.config.resolution:
        raise ValueError(f"--resolution {args.resolution}: the tokenizer takes {vqvae.config.resolution} px images")
    config = prior_config(args, vqvae.config, encoder.config)
    check_sampling_args(config.codebook_size, 1.0, None, None, args.guidance_scale)
    if config.cond_drop_prob == 0 and args.guidance_scale != 1:
        raise ValueError("--guidance_scale needs a null condition trained with --cond_drop_prob > 0; set it to 1")
    output_dir = Path(args.output_dir)
    data = DataConfig.from_args(args)
    train, validation = cached_codes(  # every process encodes its share of what the codes folder lacks
        args.vqvae,
        data,
        args.codes_cache or output_dir / "codes",
        seed=args.seed,
        batch_size=args.train_batch_size,
        progress=state.is_main_process,
        device=state.device,
        rank=state.process_index,
        world_size=state.num_processes,
        barrier=state.wait_for_everyone,
    )
    set_seed(args.seed)  # after the encoding, which only the main process may have done
    model = Prior(config)
    if config.cond_drop_prob == 0:  # the null condition is then never used, and DDP refuses unused parameters
        model.null_text.requires_grad_(False)
    text = TextFeatures(encoder, args.text_cache_mb)
    eval_rows = torch.utils.data.Subset(validation, range(min(args.eval_rows, len(validation))))

    def samples(unwrapped: torch.nn.Module) -> Image.Image:
        return sample_grid(
            unwrapped, vqvae, text, args.sample_prompts, args.samples_per_prompt, args.guidance_scale, args.seed
        )

    def save_samples(step: int, unwrapped: torch.nn.Module) -> None:
        (output_dir / "samples").mkdir(parents=True, exist_ok=True)
        samples(unwrapped).save(output_dir / "samples" / f"samples-{step:06d}.png")

    def validate(step: int, unwrapped: torch.nn.Module) -> dict[str, float]:
        return {"val_bits_per_code": bits_per_code(unwrapped, eval_rows, text, args.train_batch_size)}

    def draw_drop(sample: dict, generator: torch.Generator) -> dict:
        """Condition dropout drawn per row from (seed, epoch, row): the same for any process count or resume."""
        return {**sample, "drop": torch.rand((), generator=generator) < config.cond_drop_prob}

    trainer = Trainer(
        settings,
        model,
        train,
        make_loss(text),
        transform=draw_drop,
        hooks=TrainerHooks([(args.validation_steps, validate), (args.validation_steps, save_samples)]),
        hparams=vars(args),
    )
    trainer.fit()
    if not trainer.accelerator.is_main_process:
        return None
    final = trainer.save_model()
    samples(final).save(output_dir / "samples.png")
    limit = data.max_validation_samples or (1000 if data.is_stream else len(validation))  # as the other stages
    rows = torch.utils.data.Subset(validation, range(min(limit, len(validation))))
    metrics = {"bits_per_code": bits_per_code(final, rows, text, args.train_batch_size), "rows": len(rows)}
    return write_eval(output_dir, metrics)


if __name__ == "__main__":
    run_script(main, "prior.train")
