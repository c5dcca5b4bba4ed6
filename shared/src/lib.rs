//! whet-shared: the config schema shared by the engine, the server and the studio.
