"""Where glm-ft finds what it ships: the Hydra configs (`conf/`) beside the package in a checkout or an editable
install, or inside it (`glm_ft/conf/`) in a wheel, which maps the checkout's `conf/` there (pyproject.toml)."""

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]
CHECKOUT_ROOT = PACKAGE_DIR.parent


def config_dir() -> Path:
    packaged = PACKAGE_DIR / "conf"
    return packaged if (packaged / "config.yaml").is_file() else CHECKOUT_ROOT / "conf"
