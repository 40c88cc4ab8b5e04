"""Stand-in for OpenAI's ``clip`` package, which image-reward 1.5 imports without declaring it.

Only its CLIP / aesthetic baseline scorers use ``clip``; the ImageReward model itself does not, so an
empty module is enough for the parity check (``parity/imagereward.sh``)."""
