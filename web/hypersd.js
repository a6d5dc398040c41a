// ComfyUI-HyperSD front-end extension.
import { app } from "../../scripts/app.js";

app.registerExtension({
  name: "HyperSD.Core",
  async setup() {
    window.__hypersd_loaded = true;
  },
});
