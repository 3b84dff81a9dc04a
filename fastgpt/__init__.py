"""fastgpt: a small, fast, readable GPT trainer."""
