//! # deploy-check
//!
//! No code of its own: its tests (`tests/deploy.rs`) check the deployment files against the
//! settings the services really read, so `.env.example`, `docker-compose.yml` and
//! `deploy/Dockerfile` cannot drift from the code.
