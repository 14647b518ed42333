"""The clinicians' review loop: every classified cell is stored (`recorder`), reviewed in the browser
(`workflow`, `queries`, templates/ and static/), signed off per specimen, and exported as site data for
the next federated round (`export`). `wiring.attach` adds it all to the FastAPI app."""
