"""`dspark chat`'s logic, without the option parsing: the conversation as messages and cached tokens
(conversation.py), the session loop (session.py: messages, /commands, Ctrl-C, transcripts), reading input
(input.py). May import: everything below the commands (api, loader, prompt, views, engine, llama).
"""
