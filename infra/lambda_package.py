"""The last step of the Lambda package: prune, strip and byte-compile the zip that `chalice package` wrote.

Issue 9 items 5-6: the package is as small as can be defended, and every module ships compiled. In place, on
the zip, in one pass:

- callbridge's own code (`app.py`, `functions/`) keeps its sources and gets `__pycache__/*.cpython-311.pyc`
  beside them, so a traceback of our code shows its lines;
- every third-party module ships as sourceless byte-code only (`compileall -b` placement: `x.pyc` where
  `x.py` was): their tracebacks still name file and line, and nobody reads vendored sources in Lambda;
- files that no code path of callbridge can import or read are left out, by the reviewed PRUNE list below
  (each entry with its reason); KEEP wins over it;
- native extensions lose the symbols only a debugger reads (`strip --strip-unneeded`; the dynamic symbols
  the loader needs stay).

Byte-code is built for the runtime's Python (this interpreter, checked against the functions' Runtime) with
unchecked hashes: Lambda's unzip gives no trustworthy source mtimes, and the package never changes under them.
tests/test_lambda_package.py proves the result imports and works the way Lambda runs it.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import os
import py_compile
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

# Ours: shipped as sources with their .pyc, for readable tracebacks. config/ is data and ships as it is.
OWN_CODE = ("app.py", "functions/*")


@dataclass(frozen=True)
class Rule:
    pattern: str  # fnmatch against the zip path; `*` also matches across `/`
    reason: str


# Left out of the package. A rule that stops matching anything (a dependency moved a file) fails
# tests/test_lambda_package.py, so this list is re-read on every dependency upgrade.
PRUNE: tuple[Rule, ...] = (
    # Type-checking and packaging leftovers: read by mypy/pip, never at run time.
    Rule("*.pyi", "type stubs: read by type checkers only"),
    Rule("*/py.typed", "PEP 561 marker: read by type checkers only"),
    Rule("*.dist-info/*", "pip's records: nothing shipped calls importlib.metadata on a shipped distribution "
                          "(pydantic's plugin scan is off: PYDANTIC_DISABLE_PLUGINS in functions/core/config.py; "
                          "its email-validator and urllib3's h2 version checks are for packages not shipped)"),
    Rule("*.data/*", "wheel scripts (jmespath's jp.py command line)"),
    Rule("*/tests/*", "packages' own test suites (certifi)"),
    # cffi is a build-time tool: cryptography's compiled bindings need only the _cffi_backend extension,
    # which stays at the top level of the zip.
    Rule("cffi/*", "cffi's Python side: for building bindings, not for loading cryptography's"),
    Rule("pycparser/*", "C parser used by cffi's builder only"),
    # Powertools: callbridge uses Logger, Metrics, idempotency (DynamoDB) and parameters (SSM); those import
    # logging, metrics, middleware_factory, shared, tracing, jmespath_utils and the two utilities. Nothing
    # of theirs imports what follows, at module level or lazily (grep of their imports).
    Rule("aws_lambda_powertools/event_handler/*",
         "Powertools' own router; Chalice routes here. Only reached from shared.functions.pydantic_to_dict, "
         "when an idempotent function's data or result is a pydantic model: callbridge's are dicts and ids"),
    Rule("aws_lambda_powertools/utilities/auth_alpha/*", "not used"),
    Rule("aws_lambda_powertools/utilities/batch/*", "not used: SQS handlers take one message (batch_size=1)"),
    Rule("aws_lambda_powertools/utilities/circuit_breaker/*", "not used"),
    Rule("aws_lambda_powertools/utilities/data_classes/*", "not used: Chalice parses the events"),
    Rule("aws_lambda_powertools/utilities/data_masking/*", "not used"),
    Rule("aws_lambda_powertools/utilities/feature_flags/*", "not used"),
    Rule("aws_lambda_powertools/utilities/kafka/*", "not used"),
    Rule("aws_lambda_powertools/utilities/metadata/*", "not used"),
    Rule("aws_lambda_powertools/utilities/parser/*", "not used: the configuration's models are our own"),
    Rule("aws_lambda_powertools/utilities/streaming/*", "not used"),
    Rule("aws_lambda_powertools/utilities/validation/*", "not used"),
    Rule("aws_lambda_powertools/metrics/provider/datadog/*", "not used: metrics are CloudWatch EMF"),
    Rule("aws_lambda_powertools/utilities/idempotency/persistence/redis.py", "not used: the store is DynamoDB"),
    # pydantic
    Rule("pydantic/v1/*", "the pydantic 1 API: only imported while a model is built from a type with the old "
                          "__get_validators__ hook; every model is built when functions/ is imported, which "
                          "the package test does"),
    Rule("pydantic/mypy.py", "mypy plugin"),
    # phonenumbers: parse/is_valid_number/format_number read data/; the short-number metadata is loaded per
    # region only by shortnumberinfo's functions (emergency and short codes), which callbridge never calls.
    Rule("phonenumbers/shortdata/region_*", "short-number metadata: shortnumberinfo's functions only"),
    # tzdata: zoneinfo reads zoneinfo/<Area>/<Zone> and `zones`; these are the source tables.
    Rule("tzdata/zoneinfo/tzdata.zi", "the compiled source of the zone files; zoneinfo does not read it"),
    Rule("tzdata/zoneinfo/*.tab", "zone tables for humans and tzselect"),
    Rule("tzdata/zoneinfo/leapseconds", "leap second table; zoneinfo does not read it"),
    Rule("urllib3/contrib/emscripten/*", "imported only when sys.platform == 'emscripten' (Pyodide)"),
)

# Kept although a PRUNE rule matches.
KEEP: tuple[Rule, ...] = (
    Rule("*.dist-info/licenses/*", "the licences of what ships (Apache, BSD, MIT notices travel with copies)"),
    Rule("*.dist-info/LICENSE*", "the same, in wheels that put the licence at the top of dist-info"),
)


class PackageError(RuntimeError):
    pass


@dataclass
class Report:
    """What the step did to one zip; `matched` counts the files each PRUNE pattern removed."""

    compiled: int = 0
    sourceless: int = 0
    pruned_files: int = 0
    pruned_bytes: int = 0
    stripped_bytes: int = 0
    stripped: list[str] = field(default_factory=list)
    not_stripped: str | None = None
    matched: dict[str, int] = field(default_factory=dict)


def _matches(name: str, rules: tuple[Rule, ...]) -> Rule | None:
    return next((r for r in rules if fnmatch.fnmatchcase(name, r.pattern)), None)


def pruned_by(name: str) -> Rule | None:
    """The PRUNE rule that leaves `name` (a zip path) out of the package, or None."""
    if any(fnmatch.fnmatchcase(name, p) for p in OWN_CODE) or name.startswith("config/"):
        return None  # never ours, whatever a broad pattern says
    rule = _matches(name, PRUNE)
    return None if rule is None or _matches(name, KEEP) else rule


def is_own_code(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in OWN_CODE)


def _strip(data: bytes, scratch: Path, strip: str) -> bytes:
    path = scratch / "extension.so"
    path.write_bytes(data)
    subprocess.run([strip, "--strip-unneeded", str(path)], check=True, capture_output=True, timeout=120)  # noqa: S603
    return path.read_bytes()


def _compile(source: Path, cfile: Path, dfile: str) -> bool:
    try:
        py_compile.compile(str(source), cfile=str(cfile), dfile=dfile, doraise=True,
                           invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
    except py_compile.PyCompileError:
        return False  # a data file named .py (templates, py2-only test data): shipped as it is
    return True


def compile_package(zip_path: Path, runtime: str, strip: str | None = None) -> Report:
    """Prune, strip and byte-compile a Lambda zip in place (see the module docstring)."""
    here = f"python{sys.version_info.major}.{sys.version_info.minor}"
    if runtime != here:
        raise PackageError(f"the functions run {runtime} but the package is built with {here}: "
                           f"compiled modules would not load (use a {runtime} virtual environment)")
    strip = strip or shutil.which("strip")
    report = Report(matched={r.pattern: 0 for r in PRUNE},
                    not_stripped=None if strip else "no `strip` on PATH (binutils): extensions ship unstripped")
    with tempfile.TemporaryDirectory(prefix="callbridge-pyc-") as scratch:
        root = Path(scratch)
        tmp = zip_path.with_name(zip_path.name + ".tmp")
        # Level 9: 0.6 % smaller than zipfile's default 6 for a second more of packaging.
        with zipfile.ZipFile(zip_path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as dst:
            for info in src.infolist():
                name = info.filename
                # Whatever __pycache__ the source tree had (vendor/ follows functions/) was compiled by
                # whichever Python ran the tests, against other sources: only this step's own ship.
                if "__pycache__/" in name or name.endswith((".pyc", ".pyo")) or name.endswith("/"):
                    continue
                rule = pruned_by(name)
                if rule is not None:
                    report.matched[rule.pattern] += 1
                    report.pruned_files += 1
                    report.pruned_bytes += info.file_size
                    continue
                data = src.read(info)
                if strip and (name.endswith(".so") or ".so." in name):
                    stripped = _strip(data, root, strip)
                    report.stripped_bytes += len(data) - len(stripped)
                    report.stripped.append(name)
                    data = stripped
                if not name.endswith(".py"):
                    dst.writestr(info, data, zipfile.ZIP_DEFLATED, 9)
                    continue
                source = root / "src" / name
                source.parent.mkdir(parents=True, exist_ok=True)
                source.write_bytes(data)
                own = is_own_code(name)
                # Ours: PEP 3147 __pycache__ beside the kept source. Theirs: the legacy x.pyc in place of x.py,
                # which Python imports only when no x.py is there.
                cfile = Path(importlib.util.cache_from_source(str(source))) if own else source.with_suffix(".pyc")
                if not _compile(source, cfile, name):
                    dst.writestr(info, data, zipfile.ZIP_DEFLATED, 9)
                    continue
                if own:
                    dst.writestr(info, data, zipfile.ZIP_DEFLATED, 9)
                else:
                    report.sourceless += 1
                pyc = zipfile.ZipInfo(cfile.relative_to(root / "src").as_posix(), date_time=info.date_time)
                pyc.external_attr = 0o644 << 16
                dst.writestr(pyc, cfile.read_bytes(), zipfile.ZIP_DEFLATED, 9)
                report.compiled += 1
        os.replace(tmp, zip_path)
    return report


def zip_size(zip_path: Path) -> dict[str, int]:
    """Zipped and unzipped bytes and file count of a zip, for reports and the README."""
    with zipfile.ZipFile(zip_path) as zf:
        infos = zf.infolist()
    return {"zipped_bytes": zip_path.stat().st_size, "unzipped_bytes": sum(i.file_size for i in infos),
            "files": len(infos)}
