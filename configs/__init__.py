"""Config files: `configs/<name>.py` defines `get_config(arg)` (`ssl3d --list` lists them).

A package so that config files can `from configs import common`, experiment sweeps can import
`configs.<task>`, and the installed `ssl3d` command finds `--config=configs/<name>.py` from any
directory (`ssl3d_jax.cli.resolve_config_path`).
"""
