"""chatbus's test kit, for chatbus's own tests and for plugins': a fake OpenAI-compatible
upstream (fake_upstream.py) and the contract every history store fulfils
(store_contract.py). Needs the `test` extra (pytest, pytest-asyncio); chatbus itself never
imports it."""
