import { backendSuite } from "./suite.js";

backendSuite("memory");
