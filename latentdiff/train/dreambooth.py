"""DreamBooth (Ruiz et al. 2022, arXiv:2208.12242): fine-tune a trained model on a few images of one subject, bound to
a rare word ("a photo of sks dog"), with prior preservation: images of the subject's class that the base model
itself generated keep it from forgetting what the class looks like (``task: dreambooth``).

- Instance data: every image under ``data.path`` (``train/instance_data.py``), captioned by its ``IMAGE.txt`` /
  metadata row or else by ``dreambooth.instance_prompt``.
- Class data: the first ``num_class_images`` images (sorted by path) of ``dreambooth.class_images``, captioned by
  their caption files or ``class_prompt``. When the folder holds fewer than
  ``num_class_images`` images, the base model generates the missing ones before the first step, with the sample
  grids' sampler, ``sample_steps`` and ``sample_guidance``, on rank 0 (the other ranks wait): each written to a
  temporary name and renamed (``class_00000.png``, ...), images already there are kept, so an interrupted run
  generates only what is still missing. A resumed run's model is no longer the base, so it refuses to generate.
- Each step's batch pairs instance and class items (item i: instance ``i mod n``, class ``i mod m``, as many items
  as the larger set), and the loss is ``instance loss + prior_loss_weight * class loss``; the class half draws its
  timesteps and noise from its own per-step generator, a function of (seed, step) as the instance half's, so
  ``prior_loss_weight: 0`` trains exactly as a plain fine-tune on the instance data. ``loss_instance`` and
  ``loss_prior`` (unweighted) are logged beside ``loss`` (the total).
- Full fine-tuning or LoRA (``lora.rank``), from ``init_from``, as ``task: diffusion`` (what each saves:
  ``docs/finetuning.md``). The latent cache is off: the two halves are encoded each step.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from latentdiff.data.transforms import to_pil
from latentdiff.diffusion.model import LatentDiffusion
from latentdiff.train.diffusion import LOG_COLUMNS, DiffusionExperiment, DiffusionTrainer, step_generator
from latentdiff.train.distributed import barrier
from latentdiff.train.instance_data import PromptedFolder, count_images, prompt_sample_inputs

logger = logging.getLogger(__name__)

_PRIOR_STREAM = 1  # the class half's generator: SeedSequence([seed, step, 1]); the instance half's is (seed, step)
_GENERATION_STREAM = 2  # class image generation: SeedSequence([seed, first image's number, 2]) per batch
_GENERATION_BATCH = 8


@dataclass
class DreamBoothConfig:
    """The subject's prompt, the class's, its image folder and count, and the weight of the class loss."""

    instance_prompt: str = ""
    class_prompt: str = ""
    class_images: str = ""
    num_class_images: int = 100
    prior_loss_weight: float = 1.0

    def check(self) -> None:
        if not self.instance_prompt.strip() or not self.class_prompt.strip():
            raise ValueError("dreambooth.instance_prompt and dreambooth.class_prompt must be given (e.g. 'a photo of "
                             "sks dog' and 'a photo of dog')")
        if not self.class_images:
            raise ValueError("dreambooth.class_images must name a folder for the class images (made if missing)")
        if self.num_class_images < 1 or self.prior_loss_weight < 0:
            raise ValueError(f"dreambooth.num_class_images must be >= 1 and prior_loss_weight >= 0, got "
                             f"{self.num_class_images} and {self.prior_loss_weight}")


@dataclass
class DreamBoothExperiment(DiffusionExperiment):
    """A fine-tuning experiment on ``data.path`` with prior preservation (see the module docstring)."""

    task: str = "dreambooth"
    dreambooth: DreamBoothConfig = field(default_factory=DreamBoothConfig)
    cache_latents: bool = False

    def __post_init__(self) -> None:
        if not self.init_from:
            raise ValueError("DreamBooth fine-tunes a trained model: set init_from to it")
        if not self.data.path:
            raise ValueError("DreamBooth trains on the subject's images: set data.path to their folder")
        if self.cache_latents:
            raise ValueError("DreamBooth encodes its instance and class images each step: set cache_latents: false")
        self.dreambooth.check()
        super().__post_init__()


class PriorPairs(Dataset):
    """Instance item ``i mod n`` with class item ``i mod m`` as ``class_image`` / ``class_caption``."""

    def __init__(self, instance: Dataset, prior: Dataset) -> None:
        self.instance, self.prior = instance, prior

    def __len__(self) -> int:
        return max(len(self.instance), len(self.prior))

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = dict(self.instance[index % len(self.instance)])
        prior = self.prior[index % len(self.prior)]
        item.update(class_image=prior["image"], class_caption=prior["caption"])
        return item

    def caption(self, index: int) -> str:
        return self.instance.caption(index % len(self.instance))


def prior_generator(seed: int, step: int) -> torch.Generator:
    """The class half's CPU generator of one step: a function of (seed, step), apart from ``step_generator``'s."""
    return step_generator(seed, step, _PRIOR_STREAM)


@torch.no_grad()
def generate_class_images(model: LatentDiffusion, exp: DreamBoothExperiment) -> int:
    """Fill ``dreambooth.class_images`` up to ``num_class_images`` with the model's images of ``class_prompt``;
    returns how many were made. Images already there are kept; each new one is written atomically."""
    db = exp.dreambooth
    folder = Path(db.class_images).expanduser()
    missing = db.num_class_images - count_images(folder)
    if missing <= 0:
        return 0
    folder.mkdir(parents=True, exist_ok=True)
    free = (i for i in itertools.count() if not (folder / _class_image_name(i)).exists())
    numbers = [next(free) for _ in range(missing)]
    logger.info("generating %d class images of %r into %s", missing, db.class_prompt, folder)
    for first in tqdm(range(0, missing, _GENERATION_BATCH), desc="class images", dynamic_ncols=True):
        chunk = numbers[first:first + _GENERATION_BATCH]
        generator = step_generator(exp.train.seed, chunk[0], _GENERATION_STREAM)
        images = model.sample(len(chunk), exp.sampler, exp.sample_steps, generator, cond={"caption": db.class_prompt},
                              guidance_scale=exp.sample_guidance)
        for number, image in zip(chunk, images.cpu(), strict=True):
            tmp = folder / f".{_class_image_name(number)}.tmp"
            to_pil(image).save(tmp, format="PNG")
            tmp.replace(folder / _class_image_name(number))
    return missing


def _class_image_name(number: int) -> str:
    return f"class_{number:05d}.png"


class DreamBoothTrainer(DiffusionTrainer):
    """The hooks of a DreamBooth run on the diffusion trainer."""

    log_columns = [*LOG_COLUMNS[:1], "loss_instance", "loss_prior", *LOG_COLUMNS[1:]]
    exp: DreamBoothExperiment

    def build(self, resuming: bool) -> None:
        super().build(resuming)
        db = self.exp.dreambooth
        if self.model.config.conditioner is None or self.model.config.conditioner.text_encoder == "none":
            raise ValueError(f"DreamBooth needs a text-to-image model; {self.exp.init_from} takes no captions")
        have = count_images(db.class_images)
        if resuming and have < db.num_class_images:
            raise ValueError(f"dreambooth.class_images {db.class_images!r} holds {have} of {db.num_class_images} "
                             "images, and a resumed run's model is no longer the base to generate the rest from")
        self.generated = generate_class_images(self.model, self.exp) if self.env.is_main else 0
        barrier()  # the other ranks read the class images rank 0 wrote

    def source_data(self) -> Dataset:
        data = self.exp.data
        return PromptedFolder(data, data.path, self.exp.dreambooth.instance_prompt, "data.path")

    def training_data(self) -> Dataset:
        db = self.exp.dreambooth
        instance = super().training_data()
        return PriorPairs(instance, PromptedFolder(self.exp.data, db.class_images, db.class_prompt,
                                                   "dreambooth.class_images", limit=db.num_class_images))

    def describe(self) -> str:
        db = self.exp.dreambooth
        return (f"DreamBooth of {db.instance_prompt!r} with {db.num_class_images} class images of "
                f"{db.class_prompt!r} (prior loss weight {db.prior_loss_weight:g}); {super().describe()}")

    def prepare_samples(self) -> None:
        db = self.exp.dreambooth
        prompts = [(db.instance_prompt, db.class_prompt)[i % 2] for i in range(self.exp.sample_images)]
        self.grid_inputs = prompt_sample_inputs(self.model, prompts, self.run_dir)

    def train_step(self, batch: dict[str, Any], step: int) -> dict[str, Any] | None:
        weight = self.exp.dreambooth.prior_loss_weight
        instance_loss, logs = self.batch_loss(batch, step_generator(self.cfg.seed, step))
        prior = {"image": batch["class_image"], "caption": batch["class_caption"]}
        prior_loss, _ = self.batch_loss(prior, prior_generator(self.cfg.seed, step))
        loss = instance_loss + weight * prior_loss
        logs = dict(logs, loss=loss.detach(), loss_instance=instance_loss.detach(), loss_prior=prior_loss.detach())
        return logs if self.optimizer_step(loss, self.optimizer, step, average=self.cond_params) else None


__all__ = ["DreamBoothConfig", "DreamBoothExperiment", "DreamBoothTrainer", "PriorPairs", "generate_class_images",
           "prior_generator"]
