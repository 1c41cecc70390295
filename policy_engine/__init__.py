"""policy-engine: judge images against declarative safety policies with vision-language models.

The public API: what plugins and embedders import (semver from 1.0; see docs/plugins.md).
`import policy_engine` never imports torch, transformers or textual.
"""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _package_version
from typing import TYPE_CHECKING

from .audience import AudienceError, at_level, split_level
from .backend import Backend, Batch, Capabilities, CliFlag, Generation
from .calibration import Calibration, CalibrationError, calibrate, check_fitted, load_calibration
from .compiler import CompiledPolicy, compile_policy, policy_hash
from .errors import (
    BackendError,
    BackendUnavailableError,
    ImageError,
    OutputParseError,
    PluginError,
    PolicyEngineError,
    PolicyError,
    Problem,
    UnknownNameError,
)
from .formats.base import AnswerLayout, PromptFormat
from .grammar import answer_grammar
from .hookspecs import Register, hookimpl
from .host import PluginHost, PluginInfo, Registered, get_host
from .loader import load_policy, load_policy_text, shipped_policies
from .policy import Category, Policy, PolicyTest
from .postprocess import PostProcessor, StepContext, unknown_categories
from .types import MODES, Check, Mode, NoParams
from .verdict import (
    Action,
    Decision,
    JudgeVerdict,
    Override,
    ShadowResult,
    TraceEntry,
    Verdict,
    VerdictPart,
    build_verdict,
    parse_verdict,
)


def _version() -> str:
    try:
        return _package_version("policy-engine")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "0+unknown"


__version__ = _version()

if TYPE_CHECKING:
    from .aggregate import Post
    from .audit.policy_tests import CaseResult, run_policy_tests
    from .engine import Engine
    from .images import LoadedImage
    from .video import VideoLimits


def __getattr__(name: str) -> object:
    # The engine and the image type pull in image decoding (Pillow): load them on first use.
    if name == "Engine":
        from .engine import Engine

        return Engine
    if name == "LoadedImage":
        from .images import LoadedImage

        return LoadedImage
    if name == "Post":
        from .aggregate import Post

        return Post
    if name == "VideoLimits":
        from .video import VideoLimits

        return VideoLimits
    if name in ("CaseResult", "run_policy_tests"):
        from .audit import policy_tests

        return getattr(policy_tests, name)
    raise AttributeError(f"module 'policy_engine' has no attribute {name!r}")


__all__ = [
    "MODES",
    "Action",
    "AnswerLayout",
    "AudienceError",
    "Backend",
    "BackendError",
    "BackendUnavailableError",
    "Batch",
    "Calibration",
    "CalibrationError",
    "Capabilities",
    "CaseResult",
    "Category",
    "Check",
    "CliFlag",
    "CompiledPolicy",
    "Decision",
    "Engine",
    "Generation",
    "ImageError",
    "JudgeVerdict",
    "LoadedImage",
    "Mode",
    "NoParams",
    "OutputParseError",
    "Override",
    "PluginError",
    "PluginHost",
    "PluginInfo",
    "Policy",
    "PolicyEngineError",
    "PolicyError",
    "PolicyTest",
    "Post",
    "PostProcessor",
    "Problem",
    "PromptFormat",
    "Register",
    "Registered",
    "ShadowResult",
    "StepContext",
    "TraceEntry",
    "UnknownNameError",
    "Verdict",
    "VerdictPart",
    "VideoLimits",
    "answer_grammar",
    "at_level",
    "build_verdict",
    "calibrate",
    "check_fitted",
    "compile_policy",
    "get_host",
    "hookimpl",
    "load_calibration",
    "load_policy",
    "load_policy_text",
    "parse_verdict",
    "policy_hash",
    "run_policy_tests",
    "shipped_policies",
    "split_level",
    "unknown_categories",
]
