"""Small helpers with no layer of their own: a name -> plugin registry, asyncio task handling, prompt
truncation, text prefixes held back while streaming."""
