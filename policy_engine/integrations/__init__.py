"""Drop-ins for other libraries: the policy engine where they expect their own component.

Each module here imports its library (and torch) inside its functions only, so importing the
module is cheap and the core never pulls in a model stack. The import contracts
(pyproject.toml) keep these modules off the backends, plugins and TUI.

- `diffusers`: `PolicySafetyChecker`, in place of diffusers' `StableDiffusionSafetyChecker`.
"""
