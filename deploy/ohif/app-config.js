/**
 * OHIF viewer configuration for the Spine Response Node's deployment (deploy/compose.yaml):
 * one DICOMweb data source, Orthanc, reached through the same origin at /dicom-web (the
 * 'viewer' proxy of deploy/ohif/nginx.conf forwards it to Orthanc with the Host header, from
 * which Orthanc builds its bulk-data URLs). Options as OHIF's own configuration for a local
 * Orthanc (QIDO includefield, WADO-RS rendering, bulk data by URI, no fuzzy matching); PDFs
 * fetched as bulk data (Orthanc's /rendered does not render them).
 *
 * This very file is what tests/e2e/test_ohif.py serves to OHIF 3.13 in headless Chromium.
 */
window.config = {
  "routerBasename": "/",
  "extensions": [],
  "modes": [],
  "customizationService": {},
  "showStudyList": true,
  "maxNumberOfWebWorkers": 2,
  "showWarningMessageForCrossOrigin": false,
  "showCPUFallbackMessage": true,
  "showLoadingIndicator": true,
  "strictZSpacingForVolumeViewport": true,
  "investigationalUseDialog": {
    "option": "never"
  },
  "showErrorDetails": "always",
  "maxNumRequests": {
    "interaction": 100,
    "thumbnail": 10,
    "prefetch": 10
  },
  "defaultDataSourceName": "orthanc",
  "dataSources": [
    {
      "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
      "sourceName": "orthanc",
      "configuration": {
        "friendlyName": "Orthanc DICOMweb (Spine Response Node)",
        "name": "orthanc",
        "wadoUriRoot": "/dicom-web",
        "qidoRoot": "/dicom-web",
        "wadoRoot": "/dicom-web",
        "qidoSupportsIncludeField": true,
        "supportsReject": false,
        "dicomUploadEnabled": false,
        "imageRendering": "wadors",
        "thumbnailRendering": "wadors",
        "enableStudyLazyLoad": true,
        "supportsFuzzyMatching": false,
        "supportsWildcard": true,
        "staticWado": false,
        "singlepart": "bulkdata,video",
        "omitQuotationForMultipartRequest": true,
        "bulkDataURI": {
          "enabled": true
        }
      }
    }
  ]
};
