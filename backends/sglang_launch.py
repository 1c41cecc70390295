"""`--launch`: start SGLang's server as a subprocess, wait for it, stop it with the engine.

The command serves the checkpoint so that every mode works over both transports: a chat template
that SGLang's OpenAI path would close on a prefilled answer (chatml-llava) is given as its Jinja
twin, written to a temporary directory (see chat_templates.py).
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

from policy_engine import BackendError, BackendUnavailableError

from .chat_templates import JINJA_SOURCES, TEMPLATES, guess_template
from .http_client import HttpClient
from .sglang_options import SGLangOptions

logger = logging.getLogger(__name__)

DEFAULT_LAUNCH_MODEL = "AIML-TUDA/LlavaGuard-v1.2-0.5B-OV"


class Launcher:
    def __init__(self, options: SGLangOptions, url: str) -> None:
        self.options = options
        self.url = url
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path: Path | None = None
        self.workdir: Path | None = None

    def command(self) -> list[str]:
        """SGLang's launch command (or `launch_command`'s), for the checkpoint and port."""
        opts = self.options
        model = opts.model or DEFAULT_LAUNCH_MODEL
        port = urllib.parse.urlsplit(self.url).port or opts.launch_port
        if opts.launch_command:
            text = opts.launch_command.format(python=sys.executable, model=model, port=port)
            return shlex.split(text)
        if importlib.util.find_spec("sglang") is None:
            raise BackendUnavailableError(
                "--launch needs the sglang package, which runs on a GPU machine: "
                "pip install 'sglang[all]' there, or start a server yourself and pass --url"
            )
        command = [sys.executable, "-m", "sglang.launch_server", "--model-path", model]
        command += ["--host", "127.0.0.1", "--port", str(port)]
        template = opts.chat_template if opts.chat_template in TEMPLATES else guess_template(model)
        if template in JINJA_SOURCES:
            if self.workdir is None:
                self.workdir = Path(tempfile.mkdtemp(prefix="policy-engine-sglang-"))
            twin = self.workdir / f"{template}.jinja"
            twin.write_text(JINJA_SOURCES[template], encoding="utf-8")
            command += ["--chat-template", str(twin)]
        elif template:
            command += ["--chat-template", template]
        return command

    def start(self, http: HttpClient) -> None:
        """Start the server (its log in a temporary file, named on stderr) and wait until its
        /health answers, or it exits, or `launch_timeout` passes."""
        command = self.command()
        handle, name = tempfile.mkstemp(prefix="policy-engine-sglang-", suffix=".log")
        self.log_path = Path(name)
        logger.warning("starting %s (log: %s)", shlex.join(command), name)
        try:
            self.process = subprocess.Popen(
                command, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        except OSError as err:
            raise BackendUnavailableError(f"cannot start {command[0]}: {err.strerror}") from None
        finally:
            os.close(handle)
        http.run(self._await(http))

    async def _await(self, http: HttpClient) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.options.launch_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BackendUnavailableError(
                    f"the launched server exited with status {self.process.returncode}: "
                    f"{_tail(self.log_path)}"
                )
            if await http.healthy(http.pool.endpoints[0]) is None:
                return
            await asyncio.sleep(0.5)
        raise BackendError(
            f"the launched server did not answer {self.url}/health within "
            f"{self.options.launch_timeout:g}s"
        )

    def stop(self) -> None:
        if self.process is not None:
            _terminate(self.process)
            self.process = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None


def _tail(path: Path | None, lines: int = 5) -> str:
    if path is None or not path.exists():
        return "(no log)"
    text = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    return " | ".join(text[-lines:]) or "(empty log)"


def _terminate(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
