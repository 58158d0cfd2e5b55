"""`python -m furlong.engine.serve ...` starts the engine server (furlong/engine/server/).

The module path that launch lines, the launcher (launcher.BUILTIN_SERVER) and the tests
start servers with; the flags and the server itself live in furlong/engine/server/.
"""
from furlong.engine.server.cli import main

if __name__ == "__main__":
    main()
