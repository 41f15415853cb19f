"""MCP servers for the tests, written with the `mcp` SDK and run as real processes."""
