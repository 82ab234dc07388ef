"""argv and env to :class:`Settings`, the one path every subcommand takes.

Every setting is a flag (``--max-body-bytes``) and an env var (``OPA_TELEMETRY_SERVER_<NAME>``);
a flag beats the env var, which beats the default. A bad env var is reported only by a command
that reads that setting. Also here: the argument types with natural one-line errors, and
opening the database a command names.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from opa_telemetry_server.domain.protocol import DEFAULT_PRODUCT, product_slug
from opa_telemetry_server.errors import UsageError
from opa_telemetry_server.settings import Settings, env_name, is_loopback_url
from opa_telemetry_server.storage import Storage, open_storage

T = TypeVar("T")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class Parser(argparse.ArgumentParser):
    """argparse, with usage errors on one line (``error: --days: expected ...``), exit 2."""

    def error(self, message: str) -> NoReturn:
        message = message.removeprefix("argument ")
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


# The settings every command that opens the database reads.
STORAGE_SETTINGS = ("db", "busy_timeout", "synchronous")
GITHUB_TOKEN_ENV = "GITHUB_TOKEN"  # noqa: S105 - the variable's name, not a token
GITHUB_API = "https://api.github.com"


def product_name(text: str) -> str:
    """An argparse ``type`` for ``--product``: the product's slug (``OtherApp`` ->
    ``otherapp``), made by the same function as a User-Agent's, so names match
    case-insensitively everywhere."""
    slug = product_slug(text)
    if not slug:
        raise argparse.ArgumentTypeError(f"expected a product name, not {text!r}")
    return slug


def add_product_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--product", type=product_name, default=DEFAULT_PRODUCT,
        help="product (default: opa); compared case-insensitively, as its slug",
    )  # fmt: skip


def percentage(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 100:
        raise argparse.ArgumentTypeError(f"expected a whole number from 0 to 100, not {text!r}")
    return int(text)


class _FromEnv:
    """A setting's raw env var value, converted (and checked) only by a command that uses it."""

    __slots__ = ("name", "raw")

    def __init__(self, name: str, raw: str) -> None:
        self.name, self.raw = name, raw

    def __repr__(self) -> str:
        return f"{self.name}={self.raw!r}"


_EXPECTED = {bool: "true or false", int: "a whole number", float: "a number", str: "text"}


def settings_type(kind: type) -> Callable[[str], Any]:
    """An argparse ``type`` whose error reads naturally: ``--port: expected a whole number``."""

    def convert(text: str) -> Any:
        try:
            return _from_env(kind, text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {_EXPECTED.get(kind, kind.__name__)}, not {text!r}"
            ) from None

    return convert


def positive_int(text: str) -> int:
    """An argparse ``type`` for counts such as ``--days``."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, not {text!r}")
    return value


def add_settings_flags(
    parser: argparse.ArgumentParser,
    environ: Mapping[str, str],
    names: Sequence[str] | None = None,
) -> None:
    """Give ``parser`` a flag for each named :class:`Settings` field (all when ``names`` is
    None): ``--max-body-bytes`` for ``max_body_bytes``, defaulting to its env var
    (``OPA_TELEMETRY_SERVER_MAX_BODY_BYTES``), else the field's default.

    This is the one path from argv and env to settings for every subcommand; read the result
    with :func:`settings_from_args`.
    """
    wanted = set(names) if names is not None else None
    used = []
    for spec in fields(Settings):
        if wanted is not None and spec.name not in wanted:
            continue
        used.append(spec.name)
        flag = "--" + spec.name.replace("_", "-")
        env = env_name(spec.name)
        kind = type(spec.default)
        default: Any = _FromEnv(env, environ[env]) if env in environ else spec.default
        help_text = f"{spec.metadata['help']} (env {env}; default: {spec.default})"
        if kind is bool:
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=default, help=help_text
            )
        else:
            parser.add_argument(flag, type=settings_type(kind), default=default, help=help_text)
    if wanted is not None and (unknown := wanted.difference(used)):
        raise ValueError(f"not settings: {', '.join(sorted(unknown))}")
    parser.set_defaults(settings_fields=tuple(used))


def _from_env(kind: type, raw: str) -> Any:
    if kind is bool:
        if raw.strip().lower() in _TRUE:
            return True
        if raw.strip().lower() in _FALSE:
            return False
        raise ValueError(raw)
    return kind(raw.strip())


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The frozen settings named by parsed arguments (fields the command has no flag for keep
    their defaults). Raises :class:`UsageError` naming every bad value or env var."""
    values: dict[str, Any] = {}
    problems = []
    kinds = {spec.name: type(spec.default) for spec in fields(Settings)}
    for name in args.settings_fields:
        value = getattr(args, name)
        if isinstance(value, _FromEnv):
            try:
                value = _from_env(kinds[name], value.raw)
            except ValueError:
                expected = _EXPECTED.get(kinds[name], kinds[name].__name__)
                problems.append(f"{value!r}: expected {expected}")
                continue
        values[name] = value
    if not problems:
        try:
            return Settings(**values)
        except ValueError as exc:
            problems.append(str(exc))
    raise UsageError("; ".join(problems))


def with_storage(args: argparse.Namespace, work: Callable[[Storage], Coroutine[Any, Any, T]]) -> T:
    """Run ``work`` on the command's existing database, opened without migrating it."""
    settings = settings_from_args(args)

    async def run() -> T:
        storage = await open_storage(settings, migrate=False)
        try:
            return await work(storage)
        finally:
            await storage.close()

    return asyncio.run(run())


def read_input(name: str) -> bytes:
    """A file's bytes, or standard input's for ``-``."""
    return sys.stdin.buffer.read() if name == "-" else Path(name).read_bytes()


def with_github_token(settings: Settings, environ: Mapping[str, str]) -> Settings:
    """``settings`` with the sync token from ``$GITHUB_TOKEN`` when the setting has none and
    the sync reads GitHub itself: a token meant for GitHub never goes to another server (a
    chain's outer server, say; a stand-in on this host is fine). For any other API, name the
    token with ``--sync-token``."""
    if settings.sync_token or not environ.get(GITHUB_TOKEN_ENV):
        return settings
    url = settings.sync_api_url.rstrip("/")
    if url != GITHUB_API and not (url.startswith("http://") and is_loopback_url(url)):
        return settings
    return replace(settings, sync_token=environ[GITHUB_TOKEN_ENV])
