"""Frontends (Telegram, Discord, console) and what they share. No model code lives here."""
