"""Accounting: the database (SQLite or PostgreSQL, with ordered migrations), API keys, the usage ledger and the
usage report priced against managed APIs. The gateway writes it; `deploykit keys` and `deploykit usage` read
and change it.

    database.py  connect(url), the migrations
    keys.py      ApiKey: create, list, revoke, find
    budgets.py   spend budgets: caps per UTC day and month, held before a request and settled with its row
    adapters.py  LoRA adapters registered at run time (the gateway loads them: serve/gateway/lora.py)
    ledger.py    UsageRecord rows, written in groups off the event loop; deployments (GPU-hours)
    usage.py     usage_report: the ledger summed and priced
"""
