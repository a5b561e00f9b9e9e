#!/usr/bin/env python3
"""mcp-warden demo server: a small MCP server over stdio (newline-delimited
JSON-RPC, protocol 2025-11-25), standard library only. It keeps notes in a
directory and can 'send a report' to a host:port. A prompt-injected model
can turn send_report into exfiltration; mcp-warden stops it in the kernel."""
import json
import os
import socket
import sys

NOTES = sys.argv[1] if len(sys.argv) > 1 else os.getcwd()

TOOLS = [
    {
        "name": "read_note",
        "description": "Read a note by file name or path.",
        "inputSchema": {
            "type": "object",
            "properties": {"name": {"type": "string"}},
            "required": ["name"],
        },
        "annotations": {"readOnlyHint": True, "openWorldHint": False},
    },
    {
        "name": "run_command",
        "description": "Run a shell command (a tool the demo policy does not declare).",
        "inputSchema": {
            "type": "object",
            "properties": {"command": {"type": "string"}},
            "required": ["command"],
        },
    },
    {
        "name": "send_report",
        "description": "Send a text report to host:port.",
        "inputSchema": {
            "type": "object",
            "properties": {
                "host": {"type": "string"},
                "port": {"type": "integer"},
                "text": {"type": "string"},
            },
            "required": ["host", "port", "text"],
        },
    },
]


def result(text, is_error=False):
    return {"content": [{"type": "text", "text": text}], "isError": is_error}


def call_tool(name, args):
    try:
        if name == "read_note":
            path = os.path.join(NOTES, args["name"])
            with open(path, encoding="utf-8") as f:
                return result(f.read())
        if name == "run_command":
            import subprocess

            out = subprocess.run(args["command"], shell=True, capture_output=True, text=True)
            return result(out.stdout + out.stderr, out.returncode != 0)
        if name == "send_report":
            with socket.create_connection((args["host"], int(args["port"])), timeout=5) as s:
                s.sendall(args["text"].encode())
            return result("report sent")
        return result(f"unknown tool {name}", True)
    except OSError as e:
        return result(f"{type(e).__name__}: {e}", True)


def main():
    for line in sys.stdin:
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        mid = msg.get("id")
        method = msg.get("method")
        if mid is None:
            continue  # notification
        if method == "initialize":
            res = {
                "protocolVersion": "2025-11-25",
                "capabilities": {"tools": {}},
                "serverInfo": {"name": "warden-demo", "version": "1.0"},
            }
        elif method == "tools/list":
            res = {"tools": TOOLS}
        elif method == "tools/call":
            p = msg.get("params", {})
            res = call_tool(p.get("name"), p.get("arguments", {}))
        elif method == "ping":
            res = {}
        else:
            out = {"jsonrpc": "2.0", "id": mid, "error": {"code": -32601, "message": "method not found"}}
            sys.stdout.write(json.dumps(out) + "\n")
            sys.stdout.flush()
            continue
        sys.stdout.write(json.dumps({"jsonrpc": "2.0", "id": mid, "result": res}) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
