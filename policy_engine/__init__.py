"""policy-engine: judge images against declarative safety policies with vision-language models.

The public API. `import policy_engine` never imports torch, transformers or textual.
"""

from typing import TYPE_CHECKING

from .compiler import AnswerLayout, CompiledPolicy, compile_policy, policy_hash
from .components import (
    Backend,
    Capabilities,
    Generation,
    Mode,
    PostProcessor,
    PromptFormat,
    Request,
    unknown_categories,
)
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
from .hookspecs import hookimpl
from .host import PluginHost, get_host
from .loader import load_policy, load_policy_text, shipped_policies
from .policy import Category, Policy
from .verdict import Action, Decision, TraceEntry, Verdict, parse_verdict

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .engine import Engine


def __getattr__(name: str) -> object:
    # The engine pulls in image decoding (Pillow); load it on first use.
    if name == "Engine":
        from .engine import Engine

        return Engine
    raise AttributeError(f"module 'policy_engine' has no attribute {name!r}")


__all__ = [
    "Action",
    "AnswerLayout",
    "Backend",
    "BackendError",
    "BackendUnavailableError",
    "Capabilities",
    "Category",
    "CompiledPolicy",
    "Decision",
    "Engine",
    "Generation",
    "ImageError",
    "Mode",
    "OutputParseError",
    "PluginError",
    "PluginHost",
    "Policy",
    "PolicyEngineError",
    "PolicyError",
    "PostProcessor",
    "Problem",
    "PromptFormat",
    "Request",
    "TraceEntry",
    "UnknownNameError",
    "Verdict",
    "compile_policy",
    "get_host",
    "hookimpl",
    "load_policy",
    "load_policy_text",
    "parse_verdict",
    "policy_hash",
    "shipped_policies",
    "unknown_categories",
]
