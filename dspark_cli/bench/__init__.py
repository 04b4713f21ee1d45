"""`dspark bench`'s measurement: the prompt suites (suite, prompts), the interleaved runs (runner), the
statistics and Leviathan's formula (stats), the report as data (report: JSON and CSV) and as a terminal
table (render), and what is recorded about the machine and the models (setup). The command itself
(commands/bench.py) only parses options and calls these."""
