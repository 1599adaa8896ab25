"""Native code (llama.cpp) kept out of the app's own process.

llama.cpp is C++ compiled for a CPU: one illegal instruction, one bad pointer, and the process that loaded it ends.
So the app and the test runner never load it themselves. `worker` is the child process that does; `client` starts,
feeds and watches it; `build` compiles llama-cpp-python for this machine without the instructions that fault.
"""
