"""Text environments (``gymnasium.Env[str, str]``) and their registry."""

from envs.registry import make, register, registered

register("alfworld", "envs.alfworld.env:AlfWorldEnv")
register("math", "envs.math.env:MathEnv")
register("textworld", "envs.textworld.env:TextWorldEnv")
register("textarena", "envs.textarena.env:TextArenaEnv")
register("skyrl", "envs.skyrl.env:SkyRLEnv")

__all__ = ["make", "register", "registered"]
