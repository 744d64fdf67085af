"""The agent daemon: one per host. It registers its devices with the controller over a websocket,
runs the stage workers (and maybe the dispatcher service) of the jobs it is sent, and reports
their states. The agent's own process never imports torch; its children do.

Start one with `python -m infscaled.agent --controller URL` or, in code,
`asyncio.run(infscaled.agent.run(AgentConfig(controller=URL, token=TOKEN)))`.
"""

from infscaled.agent.config import AgentConfig
from infscaled.agent.run import run

__all__ = ["AgentConfig", "run"]
