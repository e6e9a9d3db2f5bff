"""What a synthetic cohort is made of: its settings, the annotation classes drawn, and the plan of patients and
slides (light: the command line reads the defaults from here)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from python_task.errors import ConfigError
from python_task.wsi.labels import DEFAULT_CLASSES

MALIGNANT_CLASS = "Cholangiocarcinoma"
ADENOMA_CLASS = "Biliary adenoma"
HAMARTOMA_CLASS = "Bile duct hamartoma"
BENIGN_CLASSES = (ADENOMA_CLASS, HAMARTOMA_CLASS)
CLASS_COLORS: dict[str, tuple[int, int, int]] = {
    MALIGNANT_CLASS: (200, 0, 0),
    ADENOMA_CLASS: (0, 160, 0),
    HAMARTOMA_CLASS: (0, 110, 200),
}
DIAGNOSES = DEFAULT_CLASSES  # a patient is benign or malignant: the default target classes


@dataclass(frozen=True)
class SynthConfig:
    """What ``python -m python_task synth`` makes. Sizes are level-0 pixels."""

    patients: int = 6
    seed: int = 0
    slide_size: int = 4096
    mpp: float = 0.5
    stain_variation: float = 1.0
    max_slides_per_patient: int = 2
    tile_size: int = 256
    quality: int = 90

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the setting when a value cannot make a cohort."""
        checks = [
            ("patients", self.patients >= 1, "must be at least 1"),
            ("slide_size", self.slide_size >= 512, "must be at least 512 px"),
            ("mpp", math.isfinite(self.mpp) and 0.05 <= self.mpp <= 10, "must be between 0.05 and 10 µm/px"),
            ("stain_variation", math.isfinite(self.stain_variation) and 0 <= self.stain_variation <= 5,
             "must be between 0 and 5"),
            ("max_slides_per_patient", self.max_slides_per_patient >= 1, "must be at least 1"),
            ("tile_size", self.tile_size >= 16 and self.tile_size % 16 == 0, "must be a multiple of 16"),
            ("quality", 1 <= self.quality <= 100, "must be between 1 and 100"),
        ]
        for option, ok, cause in checks:
            if not ok:
                raise ConfigError(option, cause)


@dataclass(frozen=True)
class SlideSpec:
    """One slide of the cohort plan: who it belongs to and how to draw it."""

    slide_id: str
    patient_id: str
    diagnosis: str  # "benign" or "malignant"
    size: int
    mpp: float
    stain_variation: float
    entropy: tuple[int, ...]  # seeds this slide's random generator

    def rng(self) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence(list(self.entropy)))


def plan_cohort(cfg: SynthConfig) -> list[SlideSpec]:
    """Patients, diagnoses and slides of the cohort, deterministic from ``cfg.seed``.

    Half the patients are benign, half malignant (the odd one out decided by the seed), each has 1 to
    ``max_slides_per_patient`` slides, and at least one patient has several when that is allowed.
    """
    cfg.validate()
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0x5EED]))
    diagnoses = [DIAGNOSES[i % 2] for i in range(cfg.patients)]
    if cfg.patients % 2 and rng.random() < 0.5:
        diagnoses[-1] = DIAGNOSES[1]
    diagnoses = [diagnoses[i] for i in rng.permutation(cfg.patients)]
    counts = rng.integers(1, cfg.max_slides_per_patient + 1, size=cfg.patients)
    if cfg.max_slides_per_patient > 1 and counts.max() < 2:
        counts[int(rng.integers(cfg.patients))] = 2
    width = max(3, len(str(cfg.patients)))
    specs = []
    for p, (diagnosis, count) in enumerate(zip(diagnoses, counts)):
        patient_id = f"P{p + 1:0{width}d}"
        for s in range(int(count)):
            specs.append(SlideSpec(slide_id=f"{patient_id}_S{s + 1}", patient_id=patient_id, diagnosis=diagnosis,
                                   size=cfg.slide_size, mpp=cfg.mpp, stain_variation=cfg.stain_variation,
                                   entropy=(cfg.seed, p, s)))
    return specs
