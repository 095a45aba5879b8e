"""The settings of this example, read from ONE file (federation.toml) for the shell scripts.

    python federation_config.py [CONFIG]                      # shell lines that env.sh evals
    python federation_config.py [CONFIG] --node-config SITE   # SITE's SuperNode node config (TOML)

The scripts stay plain bash and never parse TOML: this prints ``export VAR=...``
lines (and ``declare -gA SITE_...`` arrays keyed by site name) with every value
shell-quoted. CONFIG defaults to ``$FEDERATION_CONFIG``, then to the
federation.toml next to this file. ``$WORK`` in the environment replaces
``work-dir`` (so a test or a second run can write elsewhere without a copy).
"""

from __future__ import annotations

import os
import re
import shlex
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedarches.config import MODEL_KINDS
from fedarches.errors import FedarchesError, SettingError

HERE = Path(__file__).resolve().parent
DEFAULT = HERE / "federation.toml"
_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # used in paths, bash words and array keys

# table -> {key: type}; a key outside these is refused (a typo must not fall back to a default)
_KEYS: dict[str, dict[str, type]] = {
    "": {"work-dir": str, "ports": dict, "coordinator": dict, "generate": dict, "site": list},
    "ports": {"superlink": int, "atlas": int, "supernode-base": int},
    "coordinator": {"name": str, "reference": str, "condition-key": str, "label-key": str, "model": str,
                    "n-genes": int, "epochs": int, "rounds": int},
    "generate": {"cells-per-study": int, "genes": int, "cell-types": int, "seed": int},
    "site": {"name": str, "data": str, "condition-key": str, "key-dir": str, "epochs": int},
}


@dataclass
class Site:
    name: str
    data: Path
    condition_key: str
    key_dir: Path
    keygen: bool  # True: no key-dir given, the scripts generate the key pair in key_dir
    epochs: int | None
    port: int

    def node_config(self, work: Path) -> dict[str, str | int]:
        """The SuperNode's node config, in the keys ``federation.protocol.SiteConfig`` reads
        (imported here: it brings in Flower, too slow for every `. env.sh`)."""
        from fedarches.federation.protocol import SiteConfig

        site_dir = work / "sites" / self.name
        return SiteConfig(site=self.name, data=self.data, condition_key=self.condition_key, key_dir=self.key_dir,
                          out_dir=site_dir / "results", trust_root=site_dir / "root.json",
                          epochs=self.epochs).to_node_config()


@dataclass
class Federation:
    path: Path
    work: Path
    superlink_port: int
    atlas_port: int
    supernode_base_port: int
    atlas_name: str
    reference: Path
    condition_key: str
    label_key: str
    model: str
    n_genes: int
    epochs: int | None
    rounds: int
    generate: dict[str, int] | None
    sites: list[Site] = field(default_factory=list)

    def site(self, name: str) -> Site:
        for s in self.sites:
            if s.name == name:
                return s
        raise SettingError(f"setting check failed: {self.path} has no [[site]] named {name!r} "
                           f"(it has {', '.join(s.name for s in self.sites)})")


def _fail(path: Path, what: str) -> SettingError:
    return SettingError(f"setting check failed: {path}: {what}")


def _checked(path: Path, table: str, values: Any) -> dict[str, Any]:
    where = f"[{table}]" if table else "the top level"
    if not isinstance(values, dict):
        raise _fail(path, f"{where} must be a table")
    allowed = _KEYS[table]
    for key, value in values.items():
        if key not in allowed:
            raise _fail(path, f"unknown key {key!r} in {where} (allowed: {', '.join(allowed)})")
        kind = allowed[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise _fail(path, f"{key!r} in {where} must be of type {kind.__name__}")
    return values


def _required(path: Path, where: str, values: dict[str, Any], key: str) -> Any:
    if key not in values or values[key] == "":
        raise _fail(path, f"{key!r} is missing in {where}")
    return values[key]


def _absolute(base: Path, value: str) -> Path:
    """A path of the config file: relative ones are relative to the file's directory."""
    p = Path(value).expanduser()
    return Path(os.path.abspath(p if p.is_absolute() else base / p))


def _port(path: Path, value: int, key: str) -> int:
    if not 1 <= value <= 65535:
        raise _fail(path, f"port {key!r} = {value} is not in 1..65535")
    return value


def _epochs(path: Path, value: int | None, where: str) -> int | None:
    if value is not None and value < 0:
        raise _fail(path, f"epochs in {where} must be 0 (automatic) or more")
    return value or None


def load(config: str | os.PathLike[str] | None = None) -> Federation:
    """federation.toml, checked, with every path absolute and ``{work}`` expanded."""
    path = Path(config or os.environ.get("FEDERATION_CONFIG") or DEFAULT).expanduser().resolve()
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise SettingError(f"setting check failed: no federation config at {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise _fail(path, f"not valid TOML ({exc})") from None
    top = _checked(path, "", raw)
    ports = _checked(path, "ports", top.get("ports", {}))
    coord = _checked(path, "coordinator", top.get("coordinator", {}))
    generate = _checked(path, "generate", top["generate"]) if "generate" in top else None
    env_work = os.environ.get("WORK")  # relative to where the scripts run, not to the file
    work = (_absolute(Path.cwd(), env_work) if env_work
            else _absolute(path.parent, _required(path, "the top level", top, "work-dir")))

    def resolve(value: str) -> Path:
        return _absolute(path.parent, value.replace("{work}", str(work)))

    model = coord.get("model", "trvae")
    if model not in MODEL_KINDS:
        raise _fail(path, f"model {model!r} is not one of {', '.join(MODEL_KINDS)}")
    if coord.get("rounds", 1) < 1 or coord.get("n-genes", 2000) < 0:
        raise _fail(path, "rounds must be at least 1 and n-genes 0 (all genes) or more")
    fed = Federation(
        path=path, work=work,
        superlink_port=_port(path, ports.get("superlink", 9093), "superlink"),
        atlas_port=_port(path, ports.get("atlas", 8765), "atlas"),
        supernode_base_port=_port(path, ports.get("supernode-base", 9094), "supernode-base"),
        atlas_name=coord.get("name", "flower-example"),
        reference=resolve(_required(path, "[coordinator]", coord, "reference")),
        condition_key=_required(path, "[coordinator]", coord, "condition-key"),
        label_key=coord.get("label-key", ""), model=model, n_genes=coord.get("n-genes", 2000),
        epochs=_epochs(path, coord.get("epochs"), "[coordinator]"), rounds=coord.get("rounds", 1),
        generate=generate,
    )
    for i, raw_site in enumerate(top.get("site", [])):
        s = _checked(path, "site", raw_site)
        name = _required(path, f"[[site]] number {i + 1}", s, "name")
        if not _SITE_NAME.match(name) or any(name == other.name for other in fed.sites):
            raise _fail(path, f"site name {name!r} must be unique and made of letters, digits, '_', '.', '-'")
        key_dir = s.get("key-dir")
        fed.sites.append(Site(
            name=name, data=resolve(_required(path, f"[[site]] number {i + 1}", s, "data")),
            condition_key=_required(path, f"[[site]] number {i + 1}", s, "condition-key"),
            key_dir=resolve(key_dir) if key_dir else work / "sites" / name / "keys", keygen=not key_dir,
            epochs=_epochs(path, s.get("epochs"), f"[[site]] {name}"),
            port=_port(path, fed.supernode_base_port + i, f"supernode-base + {i}"),
        ))
    if not fed.sites:
        raise _fail(path, "no [[site]] table; add one per site")
    return fed


def shell_lines(fed: Federation) -> list[str]:
    """What env.sh evals: scalars as exports, per-site settings as arrays keyed by site name."""
    q = shlex.quote
    scalars = {
        "FEDERATION_CONFIG": fed.path, "WORK": fed.work,
        "SUPERLINK_PORT": fed.superlink_port, "ATLAS_PORT": fed.atlas_port,
        "SUPERNODE_BASE_PORT": fed.supernode_base_port,
        "ATLAS_NAME": fed.atlas_name, "REFERENCE": fed.reference, "CONDITION_KEY": fed.condition_key,
        "LABEL_KEY": fed.label_key, "MODEL": fed.model, "N_GENES": fed.n_genes, "EPOCHS": fed.epochs or "",
        "ROUNDS": fed.rounds, "GENERATE": int(fed.generate is not None),
        "SITES": " ".join(s.name for s in fed.sites),
    }
    lines = [f"export {k}={q(str(v))}" for k, v in scalars.items()]
    arrays = {
        "SITE_DATA": lambda s: s.data, "SITE_CONDITION_KEY": lambda s: s.condition_key,
        "SITE_KEY_DIR": lambda s: s.key_dir, "SITE_KEYGEN": lambda s: int(s.keygen),
        "SITE_EPOCHS": lambda s: s.epochs or "", "SITE_PORT": lambda s: s.port,
    }
    for name, get in arrays.items():
        items = " ".join(f"[{q(s.name)}]={q(str(get(s)))}" for s in fed.sites)
        lines.append(f"declare -gA {name}=({items})")
    return lines


def main(argv: list[str]) -> int:
    args = list(argv)
    site = None
    if "--node-config" in args:
        i = args.index("--node-config")
        if i + 1 >= len(args):
            print("usage: federation_config.py [CONFIG] [--node-config SITE]", file=sys.stderr)
            return 2
        site = args[i + 1]
        del args[i:i + 2]
    try:
        fed = load(args[0] if args else None)
        if site is None:
            print("\n".join(shell_lines(fed)))
        else:
            import tomli_w

            print(tomli_w.dumps(fed.site(site).node_config(fed.work)), end="")
    except FedarchesError as exc:
        print(f"federation_config.py: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
