"""Compatibility with the reference implementation (github Araachie/loom-cfm): its command-line flags and
its YAML configs, translated into ours. Described from its code, never copied (it is GPL-3.0)."""
