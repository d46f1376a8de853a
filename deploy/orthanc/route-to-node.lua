-- Spine Response Node: Orthanc auto-routing (Lua, no Python plugin).
--
-- When a study becomes stable in Orthanc (no new instance for "StableAge" seconds), every
-- series of it that the node analyses -- MR images and the CyberKnife RT objects (RTPLAN,
-- RTSTRUCT, RTDOSE, RTRECORD) -- is sent by C-STORE to the DICOM modality named NODE below
-- (declare it in "DicomModalities" of orthanc.json).
--
-- Never routed back: the node's own results (DICOM SEG, Parametric Maps -- Modality MR! --,
-- Structured Reports, encapsulated PDF, spatial registrations), recognised by their SOP
-- class and by the sending AE title -- and the MR companion series the maps reference
-- (Manufacturer "Spine Response Node", Image Type DERIVED), even when they reach Orthanc from
-- another sender (a PACS forwarding them). A routed series is marked with the user metadata
-- "SpineNodeRouted" (declare it in "UserMetadata") so that a study that becomes stable
-- again -- e.g. when the node's results arrive in it -- is not sent a second time; only new
-- series are.
--
-- Sending is an asynchronous Orthanc job (see GET /jobs); a failed job can be resubmitted
-- (POST /jobs/{id}/resubmit) or the study re-sent from Orthanc Explorer.

local NODE = 'spinenode'          -- symbolic name of the node in "DicomModalities"
local MARK = 'SpineNodeRouted'    -- user metadata, declared in "UserMetadata"

local ROUTED_MODALITIES = {
  MR = true, RTPLAN = true, RTSTRUCT = true, RTDOSE = true, RTRECORD = true,
}

-- SOP class UID prefixes of derived objects (the node's outputs, reports) never routed
local DERIVED_SOP_CLASSES = {
  '1.2.840.10008.5.1.4.1.1.30',      -- Parametric Map
  '1.2.840.10008.5.1.4.1.1.66.',     -- Segmentation, Spatial Registration, ...
  '1.2.840.10008.5.1.4.1.1.88.',     -- Structured Reports (TID 1500 ...)
  '1.2.840.10008.5.1.4.1.1.104.',    -- Encapsulated PDF
  '1.2.840.10008.5.1.4.1.1.11.',     -- Presentation States
}

-- Manufacturer the node writes in its outputs (its MR companion series among them)
local NODE_MANUFACTURER = 'Spine Response Node'

local function startsWith(text, prefix)
  return string.sub(text, 1, string.len(prefix)) == prefix
end

local function isDerived(sopClassUid)
  for _, prefix in ipairs(DERIVED_SOP_CLASSES) do
    if startsWith(sopClassUid or '', prefix) then
      return true
    end
  end
  return false
end

-- The node's derived MR companion series (the 3-D series its Parametric Maps reference):
-- the node's Manufacturer and Image Type DERIVED (a first instance's tag read on demand)
local function isNodeCompanion(seriesTags, instanceId)
  if (seriesTags['Manufacturer'] or '') ~= NODE_MANUFACTURER then
    return false
  end
  local ok, imageType = pcall(RestApiGet, '/instances/' .. instanceId .. '/content/0008-0008')
  return not ok or imageType == nil or startsWith(string.upper(imageType), 'DERIVED')
end

-- AE title of the node, to recognise what it sent us (nil if it cannot be read)
local function nodeAet()
  local ok, answer = pcall(RestApiGet, '/modalities/' .. NODE .. '/configuration')
  if ok and answer ~= nil then
    local config = ParseJson(answer)
    if config ~= nil then
      return config['AET']
    end
  end
  return nil
end

local function alreadyRouted(seriesId)
  local metadata = ParseJson(RestApiGet('/series/' .. seriesId .. '/metadata?expand'))
  return metadata ~= nil and metadata[MARK] ~= nil
end

function OnStableStudy(studyId, tags, metadata)
  local fromNode = nodeAet()
  local series = ParseJson(RestApiGet('/studies/' .. studyId .. '/series'))
  local toSend = {}
  for _, s in ipairs(series) do
    local modality = s['MainDicomTags']['Modality'] or ''
    local first = s['Instances'][1]
    if ROUTED_MODALITIES[modality] and first ~= nil and not alreadyRouted(s['ID']) then
      local info = ParseJson(RestApiGet('/instances/' .. first .. '/metadata?expand'))
      local sopClass = info['SopClassUid'] or ''
      local remoteAet = info['RemoteAET'] or ''
      if not isDerived(sopClass) and (fromNode == nil or remoteAet ~= fromNode)
          and not isNodeCompanion(s['MainDicomTags'], first) then
        table.insert(toSend, s['ID'])
      end
    end
  end
  if #toSend == 0 then
    return
  end
  RestApiPost('/modalities/' .. NODE .. '/store',
              DumpJson({ Resources = toSend, Synchronous = false }, true))
  for _, seriesId in ipairs(toSend) do
    -- a configuration without the user metadata still routes (and may re-send duplicates,
    -- which the node ignores)
    pcall(RestApiPut, '/series/' .. seriesId .. '/metadata/' .. MARK, 'yes')
  end
  print('spine-node routing: study ' .. studyId .. ': ' .. #toSend ..
        ' series sent to modality ' .. NODE)
end
