// The client module lives where the edge embeds and serves it (/js/voicerooms.js), so the
// container build (which copies services/ and shared/) and this package use the same file.
export * from '../../services/edge/static/js/voicerooms.js';
