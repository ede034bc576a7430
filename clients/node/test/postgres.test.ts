import { backendSuite } from "./suite.js";

backendSuite("postgres");
