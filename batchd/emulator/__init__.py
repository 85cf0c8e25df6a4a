"""A local emulator of OpenAI's Batch API and Anthropic's Message Batches API, for tests and demos.

Usage::

    async with await start_emulator(EmulatorConfig(processing_seconds=0.5)) as emu:
        client = openai.AsyncOpenAI(base_url=emu.openai_base_url, api_key="sk-test")
"""

from batchd.emulator.config import EmulatorConfig, Faults
from batchd.emulator.server import RunningEmulator, start_emulator

__all__ = ["EmulatorConfig", "Faults", "RunningEmulator", "start_emulator"]
