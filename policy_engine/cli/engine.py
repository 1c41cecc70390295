"""The options every engine-running command shares, and the backends' own flags.

    @cli.command(cls=EngineCommand)
    @click.argument("images", nargs=-1)
    @engine_options()
    def assess(images, engine: EngineChoice): ...

`engine_options` adds the shared options (--policy, --backend, --mode, -o, --meta,
--batch-size, --lenient-replies) and hands the command one `EngineChoice` as its `engine`
argument. `EngineCommand` adds the flags that installed backends declare (`Backend.cli_flags`:
--model, --url, --transport, …) when click asks for the command's parameters, so the core names
no backend and a third-party backend's flags appear in `--help` like the built-ins'.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, TypeVar

import click
import yaml
from click.core import ParameterSource

from ..backend import CliFlag
from ..errors import PluginError, PolicyEngineError
from ..host import PluginHost, get_host
from .group import POLICY_HELP

if TYPE_CHECKING:
    from ..engine import Engine

F = TypeVar("F", bound=Callable[..., Any])
FLAG_PREFIX = "backend_flag_"
SHARED = (
    "policy",
    "backend",
    "mode",
    "options",
    "meta",
    "batch_size",
    "lenient",
    "shadow",
    "calibration",
    "video_limits",
)


def parse_pairs(pairs: tuple[str, ...] | list[str], what: str) -> dict[str, Any]:
    """KEY=VALUE pairs as a dict; values are YAML scalars (`true`, `0.5`, `a,b`)."""
    result: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint=what)
        try:
            result[key] = yaml.safe_load(value) if value else ""
        except yaml.YAMLError:
            result[key] = value
    return result


@dataclass(frozen=True)
class BackendFlag:
    """One command-line flag and the backends that declare it."""

    declared: CliFlag
    backends: tuple[str, ...]

    @property
    def name(self) -> str:
        return FLAG_PREFIX + self.declared.option

    def option(self) -> click.Option:
        d = self.declared
        names = [d.flag, *([d.short] if d.short else []), self.name]
        which = ", ".join(self.backends)
        kwargs: dict[str, Any] = {"help": f"{d.help} [{which}]".strip(), "default": None}
        if d.is_flag:
            kwargs |= {"is_flag": True, "default": False}
        elif d.multiple:
            kwargs |= {"multiple": True, "default": ()}
        if d.choices:
            kwargs["type"] = click.Choice(list(d.choices))
        if d.metavar:
            kwargs["metavar"] = d.metavar
        return click.Option(names, **kwargs)


def backend_flags(host: PluginHost) -> list[BackendFlag]:
    """The flags the installed backends declare, one per flag name, in name order. Two
    backends may share a flag only for an option of the same name."""
    found: dict[str, tuple[CliFlag, list[str]]] = {}
    for name, entry in sorted(host.backends().items()):
        for flag in entry.obj.cli_flags:
            if flag.option not in entry.obj.Options.model_fields:
                raise PluginError(
                    f"backend {name!r} (plugin {entry.plugin!r}) declares {flag.flag} for "
                    f"option {flag.option!r}, which its Options do not have"
                )
            if flag.flag in found and found[flag.flag][0].option != flag.option:
                first = found[flag.flag][1][0]
                raise PluginError(
                    f"{flag.flag} means option {found[flag.flag][0].option!r} for backend "
                    f"{first!r} but {flag.option!r} for backend {name!r}"
                )
            found.setdefault(flag.flag, (flag, []))[1].append(name)
    return [BackendFlag(flag, tuple(names)) for _, (flag, names) in sorted(found.items())]


class EngineCommand(click.Command):
    """A command that runs an engine: its parameters include the backends' own flags."""

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        params = super().get_params(ctx)
        flags = ctx.meta.get("policy_engine.backend_flags")
        if flags is None:
            flags = ctx.meta["policy_engine.backend_flags"] = backend_flags(get_host())
        at = len(params) - (1 if self.get_help_option(ctx) is not None else 0)
        return [*params[:at], *(flag.option() for flag in flags), *params[at:]]


@dataclass(frozen=True)
class EngineChoice:
    """What the shared options and the backend flags collected; `build` makes the Engine."""

    policy: str | None
    backend: str
    mode: str
    options: tuple[str, ...] = ()
    meta: tuple[str, ...] = ()
    batch_size: int | None = None
    lenient: bool = False
    flags: dict[str, Any] = field(default_factory=dict)  # backend option -> value, as given
    given: tuple[str, ...] = ()  # flags given on the command line ("--policy", "--url", …)
    shadow: str | None = None  # a policy judged in shadow beside the live one
    calibration: str | None = None  # a calibration file (over the policy's `calibration`)
    video_limits: tuple[str, ...] = ()  # --video-limit KEY=VALUE

    def with_policy(self, policy: str) -> EngineChoice:
        return replace(self, policy=policy)

    @property
    def metadata(self) -> dict[str, Any]:
        return parse_pairs(self.meta, "--meta")

    def backend_options(self) -> dict[str, Any]:
        """-o pairs, then the backend flags given (a flag wins over -o for its option)."""
        options = parse_pairs(self.options, "--option")
        options.update(self.flags)
        return options

    def check_flags(self, host: PluginHost | None = None) -> None:
        """A flag given for a backend that has no such option is a user error."""
        cls = (host or get_host()).backend(self.backend)
        for flag in backend_flags(host or get_host()):
            option = flag.declared.option
            if option in self.flags and option not in cls.Options.model_fields:
                raise PolicyEngineError(
                    f"{flag.declared.flag} does not apply to backend {self.backend!r} "
                    f"(it is for: {', '.join(flag.backends)})"
                )

    def limits(self) -> Any:
        """The --video-limit pairs as VideoLimits (None: the defaults)."""
        if not self.video_limits:
            return None
        from dataclasses import fields

        from ..video import VideoLimits

        pairs = parse_pairs(self.video_limits, "--video-limit")
        known = [f.name for f in fields(VideoLimits)]
        for key, value in pairs.items():
            if key not in known:
                raise PolicyEngineError(
                    f"--video-limit: unknown limit {key!r}; limits: {', '.join(known)}"
                )
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise PolicyEngineError(f"--video-limit {key}: must be a positive number")
        try:
            return VideoLimits(**pairs)
        except (TypeError, ValueError) as err:
            raise PolicyEngineError(f"--video-limit: {err}") from None

    def build(self, *, concurrency: int | None = None, policy: Any = None) -> Engine:
        """The Engine (not loaded). `concurrency` goes to the backend when it has such an
        option (HTTP backends: requests in flight), else to the engine."""
        from ..engine import Engine

        self.check_flags()
        options = self.backend_options()
        engine_concurrency = 1
        if concurrency is not None:
            backend_cls = get_host().backend(self.backend)
            if "concurrency" in backend_cls.Options.model_fields:
                options.setdefault("concurrency", concurrency)
            else:
                engine_concurrency = concurrency
        chosen = policy if policy is not None else self.policy
        if chosen is None:
            raise PolicyEngineError("no policy given")
        return Engine(
            chosen,
            self.backend,
            mode=self.mode,  # type: ignore[arg-type]
            backend_options=options,
            batch_size=self.batch_size,
            concurrency=engine_concurrency,
            lenient=self.lenient,
            shadow=self.shadow,
            calibration=self.calibration,
            video_limits=self.limits(),
        )


def engine_options(*, policy: bool = True) -> Callable[[F], F]:
    """Add the shared engine options (and --policy, unless the command takes the policy as an
    argument) and pass the command `engine: EngineChoice`. Use with `cls=EngineCommand`."""
    options = [
        click.option(
            "--backend",
            "-b",
            "backend",
            default="transformers",
            show_default=True,
            help="A backend name (`backends`).",
        ),
        click.option(
            "--mode",
            type=click.Choice(["full", "verdict", "score"]),
            default="full",
            show_default=True,
            help="full: rating, category, rationale; verdict: no rationale; score: P(Unsafe) "
            "and per-category scores from one forward pass, no rationale.",
        ),
        click.option(
            "--option",
            "-o",
            "options",
            multiple=True,
            metavar="KEY=VALUE",
            help="A backend option (repeatable); values are YAML scalars. `policy-engine "
            "backends` lists each backend's options.",
        ),
        click.option(
            "--meta",
            "meta",
            multiple=True,
            metavar="KEY=VALUE",
            help="Request metadata for post-processors (repeatable), e.g. audience=minors.",
        ),
        click.option(
            "--batch-size", type=click.IntRange(min=1), default=None, help="Images per call."
        ),
        click.option(
            "--video-limit",
            "video_limits",
            multiple=True,
            metavar="KEY=VALUE",
            help="A limit on video input (repeatable): max_bytes, max_seconds, max_pixels, "
            "max_decoded_frames (docs/video.md).",
        ),
        click.option(
            "--lenient-replies",
            "lenient",
            is_flag=True,
            default=False,
            help="Read replies that wrap their JSON object in prose (servers that ignore the "
            "schema); prose that names the other rating is still an error.",
        ),
        click.option(
            "--shadow",
            "shadow",
            default=None,
            metavar="POLICY",
            help="Also judge each image against this policy in shadow: its decision is "
            "recorded under the Decision's `shadow`, never enforced (docs/shadow.md).",
        ),
        click.option(
            "--calibration",
            "calibration",
            default=None,
            metavar="FILE",
            help="A calibration file (`policy-engine calibrate`) mapping P(Unsafe); default: "
            "the policy's `calibration`, if any.",
        ),
    ]
    if policy:
        options.insert(
            0,
            click.option(
                "--policy",
                "-p",
                "policy",
                default="llavaguard",
                show_default=True,
                help=POLICY_HELP,
            ),
        )

    def decorate(command: F) -> F:
        @functools.wraps(command)
        def run(*args: Any, **kwargs: Any) -> Any:
            ctx = click.get_current_context()
            if not isinstance(ctx.command, EngineCommand):  # pragma: no cover - a wiring bug
                raise TypeError(f"{ctx.command.name}: engine_options needs cls=EngineCommand")
            kwargs["engine"] = engine_choice(ctx, kwargs, with_policy=policy)
            return command(*args, **kwargs)

        wrapped: Any = run
        for option in reversed(options):
            wrapped = option(wrapped)
        return wrapped  # type: ignore[no-any-return]

    return decorate


def engine_choice(
    ctx: click.Context, kwargs: dict[str, Any], *, with_policy: bool = True
) -> EngineChoice:
    """Take the shared options and the backend flags out of a command's arguments (`kwargs`,
    changed in place)."""
    shared = SHARED if with_policy else tuple(n for n in SHARED if n != "policy")
    values = {name: kwargs.pop(name) for name in shared if name in kwargs}
    flags: dict[str, Any] = {}
    for name in [k for k in kwargs if k.startswith(FLAG_PREFIX)]:
        value = kwargs.pop(name)
        if value not in (None, (), False):
            flags[name[len(FLAG_PREFIX) :]] = list(value) if isinstance(value, tuple) else value
    opts = {p.name: p.opts[0] for p in ctx.command.get_params(ctx) if p.name}
    given = tuple(
        opts[name]
        for name in ctx.params
        if name in opts
        and ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE
        and (name in shared or name.startswith(FLAG_PREFIX))
    )
    return EngineChoice(
        policy=values.get("policy") if with_policy else None,
        backend=values["backend"],
        mode=values["mode"],
        options=tuple(values.get("options", ())),
        meta=tuple(values.get("meta", ())),
        batch_size=values.get("batch_size"),
        lenient=bool(values.get("lenient", False)),
        shadow=values.get("shadow"),
        calibration=values.get("calibration"),
        flags=flags,
        given=given,
        video_limits=tuple(values.get("video_limits", ())),
    )
