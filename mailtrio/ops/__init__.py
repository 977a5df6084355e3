"""Operator tools: the queue subcommands over the internal HTTP API and the pre-flight `check`.

`client` speaks to the internal API (stdlib HTTP only), `output` prints aligned tables or JSON,
`commands` holds the subcommands (`deliveries`, `dead-letters`, `malformed`, `schedule`) and
`check` runs every start-up step without starting the service.
"""
