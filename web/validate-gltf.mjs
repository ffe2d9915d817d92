// Validate a glTF binary with the Khronos glTF validator: node web/validate-gltf.mjs FILE.glb
// prints the validator's JSON report; exit 0 when it found no errors, 1 otherwise.
import { readFile } from "node:fs/promises";
import validator from "gltf-validator";

const file = process.argv[2];
const bytes = new Uint8Array(await readFile(file));
const report = await validator.validateBytes(bytes, { uri: file, maxIssues: 100 });
console.log(JSON.stringify(report));
process.exit(report.issues.numErrors === 0 ? 0 : 1);
