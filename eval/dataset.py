"""The DreamBooth dataset layout: one folder per subject and prompts_and_classes.txt.

prompts_and_classes.txt (as published with the DreamBooth dataset) lists ``subject_name,class`` under
"Classes" and two Python-style prompt lists, "Object Prompts" and "Live Subject Prompts", whose items
read ``'a {0} {1} in the jungle'.format(unique_token, class_token)``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from nblora_diffusion._deprecated import deprecated_names
from nblora_diffusion.metrics import list_images

PROMPTS_FILE = "prompts_and_classes.txt"
BUNDLED = Path(__file__).resolve().parents[1] / "assets" / "dreambooth"
LIVE_CLASSES = ("cat", "dog")  # the dataset's live subjects are its cats and dogs; all others are objects
PROMPT_SETS = ("dreambooth-object", "dreambooth-live", "dreambooth-auto")
_ITEM = re.compile(r"""^\s*(['"])(.*)\1\s*\.format\(""")


@dataclass(frozen=True)
class Subject:
    name: str
    class_noun: str
    folder: Path

    @property
    def live(self) -> bool:
        return self.class_noun in LIVE_CLASSES


@dataclass(frozen=True)
class PromptLists:
    classes: dict[str, str]  # subject name -> class noun
    object: tuple[str, ...]  # templates with {0} = token, {1} = class noun
    live: tuple[str, ...]


def parse_prompts_and_classes(text: str, source: str = PROMPTS_FILE) -> PromptLists:
    classes: dict[str, str] = {}
    lists: dict[str, list[str]] = {"object": [], "live": []}
    section = None
    for line in text.splitlines():
        s = line.strip()
        low = s.lower()
        if low == "classes":
            section = "classes"
        elif low.startswith("object prompts"):
            section = "object"
        elif low.startswith("live subject prompts"):
            section = "live"
        elif section == "classes" and "," in s and low != "subject_name,class":
            name, noun = (x.strip() for x in s.split(",", 1))
            classes[name] = noun
        elif section in lists and (m := _ITEM.match(s)):
            lists[section].append(m.group(2))
    if not classes or not lists["object"] or not lists["live"]:
        raise ValueError(
            f"{source} is not a DreamBooth prompts_and_classes.txt (need Classes, Object Prompts "
            f"and Live Subject Prompts; found {len(classes)} classes, {len(lists['object'])} object "
            f"and {len(lists['live'])} live prompts)"
        )
    return PromptLists(classes, tuple(lists["object"]), tuple(lists["live"]))


def read_prompt_lists(path: str | os.PathLike) -> PromptLists:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{PROMPTS_FILE} not found: {path}")
    return parse_prompts_and_classes(path.read_text(encoding="utf-8"), str(path))


@dataclass(frozen=True)
class DreamBoothBenchmark:
    """The DreamBooth benchmark's subjects and prompt lists (not a torch Dataset: that is
    ``nblora_diffusion.training.data.DreamBoothDataset``, the training photos)."""

    root: Path
    prompts: PromptLists
    subjects: dict[str, Subject]  # subjects listed in the file whose folder holds images

    def select(self, spec: str | list[str]) -> list[Subject]:
        """'all', a comma-separated string or a list of subject names (ValueError names what is missing)."""
        names = spec if isinstance(spec, list) else [s.strip() for s in spec.split(",") if s.strip()]
        if names == ["all"]:
            return list(self.subjects.values())
        if not names:
            raise ValueError("no subjects selected")
        missing = [n for n in names if n not in self.subjects]
        if missing:
            raise ValueError(
                f"subject(s) {', '.join(missing)} not in {self.root} "
                f"(available: {', '.join(self.subjects) or 'none'})"
            )
        return [self.subjects[n] for n in dict.fromkeys(names)]

    def templates(self, subject: Subject) -> tuple[str, ...]:
        return self.prompts.live if subject.live else self.prompts.object


def read_dataset(root: str | os.PathLike) -> DreamBoothBenchmark:
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"dataset folder not found: {root}")
    prompts = read_prompt_lists(root / PROMPTS_FILE)
    subjects = {}
    for name, noun in prompts.classes.items():
        folder = root / name
        if folder.is_dir():
            list_images(folder)  # an empty subject folder is an error, not a silent skip
            subjects[name] = Subject(name, noun, folder)
    if not subjects:
        raise ValueError(f"no subject folder of {root / PROMPTS_FILE} exists in {root}")
    return DreamBoothBenchmark(root, prompts, subjects)


def format_prompt(template: str, token: str, class_noun: str) -> str:
    """'a {0} {1} in the jungle' or 'a {token} {class_noun} ...' -> 'a sks dog in the jungle'."""
    try:
        text = template.format(token, class_noun, token=token, class_noun=class_noun)
    except (IndexError, KeyError, ValueError) as e:
        raise ValueError(
            f"bad prompt template {template!r}: use {{0}}/{{token}} and {{1}}/{{class_noun}} ({e})"
        ) from None
    return " ".join(text.split())


def prompt_templates(spec: str, class_noun: str, prompts_file: str | os.PathLike | None = None) -> list[str]:
    """Templates for --prompts: a file (one per line, '#' comments) or a DreamBooth list.

    The DreamBooth lists come from ``prompts_file`` when given, else the copy bundled with the project.
    """
    if spec in PROMPT_SETS:
        lists = read_prompt_lists(prompts_file or BUNDLED / PROMPTS_FILE)
        live = spec == "dreambooth-live" or (spec == "dreambooth-auto" and class_noun in LIVE_CLASSES)
        return list(lists.live if live else lists.object)
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"--prompts {spec!r} is neither a file nor one of {', '.join(PROMPT_SETS)}")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    templates = [ln for ln in lines if ln and not ln.startswith("#")]
    if not templates:
        raise ValueError(f"prompt file {path} has no prompts")
    return templates


def find_prompts_file(instance_dir: str | os.PathLike) -> Path | None:
    """prompts_and_classes.txt next to a subject folder (DreamBooth layout), if there is one."""
    candidate = Path(instance_dir).resolve().parent / PROMPTS_FILE
    return candidate if candidate.is_file() else None


__getattr__ = deprecated_names(
    __name__, {"DreamBoothDataset": ("eval.dataset.DreamBoothBenchmark", lambda: DreamBoothBenchmark)}
)
