"""Simulators: the vLLM replica capacity model, the engine simulator (HTTP) and the fleet simulator."""
